"""``ftl run``: chain the stages of a pipeline YAML by their output folders and manifests."""

from ftl.pipeline.runner import PipelinePlan, PipelineSpec, StageReport, check, load_pipeline, run

__all__ = ["PipelinePlan", "PipelineSpec", "StageReport", "check", "load_pipeline", "run"]
