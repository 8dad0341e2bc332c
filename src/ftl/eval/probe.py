"""Peak resident memory of one model, measured in a process of its own: load, generate once, report.

The interpreter with ftl and the model's own runtime imported (onnxruntime-genai for ``onnx:``,
torch and transformers for ``torch:``) is measured first (``baseline_mib``); the model's share is the
peak less that. An ONNX model's process never imports torch: its figure is what an edge box needs.
Run by ``ftl eval`` as ``python -m ftl.eval.probe SPEC``.
"""

import json
import sys

from ftl.system import peak_rss_mib


def main() -> None:
    spec = sys.argv[1]
    if spec.startswith("onnx:"):
        import onnxruntime_genai  # noqa: F401
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    from ftl.eval.models import load

    baseline = peak_rss_mib()
    model = load(spec)
    model.generate(model.format.conversation("Say hello."), 8)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "baseline_mib": baseline}))


if __name__ == "__main__":
    main()
