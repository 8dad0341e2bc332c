"""Peak resident memory of one model, measured in a process of its own: load, generate once, report."""

import json
import sys

from ftl.eval.models import load
from ftl.system import peak_rss_mib


def main() -> None:
    spec = sys.argv[1]
    model = load(spec)
    model.generate(model.format.conversation("Say hello."), 8)
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
