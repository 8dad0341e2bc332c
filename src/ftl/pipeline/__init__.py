"""``ftl run``: chain the stages of a pipeline YAML by their output folders and manifests."""

from ftl.pipeline.runner import PipelineSpec, StageReport, load_pipeline, run

__all__ = ["PipelineSpec", "StageReport", "load_pipeline", "run"]
