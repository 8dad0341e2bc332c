"""Azure ML: ftl's jobs and workspace access. Needs the [azure] extra (azure-ai-ml), imported lazily."""
