"""Peak resident memory of one model, measured in a process of its own: load, generate once, report."""

import json
import resource
import sys

from ftl.eval.models import load


def main() -> None:
    spec = sys.argv[1]
    model = load(spec)
    model.generate(model.format.conversation("Say hello."), 8)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
