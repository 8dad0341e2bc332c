"""report.md and report.html: a side-by-side table and four plots (matplotlib, Agg backend)."""

from __future__ import annotations

import html
from pathlib import Path

COLUMNS = [
    ("size MB", lambda m: m["size_mb"], "{:.1f}"),
    ("peak RSS MiB", lambda m: m.get("peak_rss_mib"), "{:.0f}"),
    ("model RSS MiB", lambda m: m.get("model_rss_mib"), "{:.0f}"),  # the peak less the bare interpreter's
    ("ppl (answer)", lambda m: m["perplexity_answer"], "{:.3f}"),
    ("ppl (full)", lambda m: m["perplexity_full"], "{:.3f}"),
    ("NLL/byte", lambda m: m["nll_per_byte"], "{:.4f}"),
    ("KL vs source", lambda m: m.get("kl_divergence"), "{:.4f}"),
    ("top-1 agree", lambda m: m.get("top1_agreement"), "{:.3f}"),
    ("ROUGE-1", lambda m: m["rouge1"], "{:.3f}"),
    ("ROUGE-2", lambda m: m["rouge2"], "{:.3f}"),
    ("ROUGE-L", lambda m: m["rougeL"], "{:.3f}"),
    ("numeric acc", lambda m: m.get("numeric_accuracy"), "{:.3f}"),
    ("TTFT p50 ms", lambda m: m["ttft_ms"]["p50"], "{:.0f}"),
    ("latency p50/p95/p99 ms", lambda m: "/".join(f"{m['latency_ms'][k]:.0f}" for k in ("p50", "p95", "p99")), "{}"),
    ("decode tok/s", lambda m: m["decode_tokens_per_s"], "{:.1f}"),
    ("threads", lambda m: m["threads"], "{}"),
]


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model"] + [name for name, _, _ in COLUMNS]
    rows = []
    for label, metrics in summary["models"].items():
        cells = [label]
        for _, get, fmt in COLUMNS:
            value = get(metrics)
            cells.append("—" if value is None else fmt.format(value))
        rows.append(cells)
    return header, rows


def unbatched_note(summary: dict) -> str | None:
    """Which models answered one at a time, and why (None: every model batched its answers)."""
    from ftl.generate.engine import UNBATCHED

    labels = [label for label, metrics in summary["models"].items() if metrics.get("batched_answers") is False]
    return f"{', '.join(labels)}: {UNBATCHED}." if labels else None


def write_report(out: Path, summary: dict, comparison: list[dict]) -> None:
    plots = _plots(out, summary)
    header, rows = table_rows(summary)
    md = [f"# ftl eval — {summary['samples']} samples from `{summary['data']}`", "",
          f"Hardware: {summary['hardware']}  ", "Versions: " + ", ".join(
              f"{k} {v}" for k, v in summary["versions"].items() if v), "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    if not summary["tokenizers_agree"]:
        md += ["", "The models use different tokenizers: token perplexities are not comparable, so NLL per "
                   "byte of the reference answer is the number to compare."]
    md += ["", note] if (note := unbatched_note(summary)) else []
    if comparison:
        md += ["", "## Change from the earlier run", "", "| model | metric | before | now | change |", "|---|---|---|---|---|"]
        md += [f"| {c['model']} | {c['metric']} | {c['before']:.4f} | {c['now']:.4f} | {c['change']:+.4f} |"
               for c in comparison]
    md += [""] + [f"![{name}]({file})" for name, file in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")

    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    images = "".join(f'<figure><img src="{file}" alt="{name}"><figcaption>{name}</figcaption></figure>'
                     for name, file in plots)
    (out / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>ftl eval</title><style>body{font-family:sans-serif;margin:2em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child{text-align:left}img{max-width:640px}</style>"
        f"<h1>ftl eval — {summary['samples']} samples</h1><p>{html.escape(summary['hardware'])}</p>"
        f"<table><tr>{cells}</tr>{body}</table>{images}\n")


def _plots(out: Path, summary: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import json

    import matplotlib.pyplot as plt

    models = summary["models"]
    labels = [label.split(":", 1)[0] + ":" + Path(label.split(":", 1)[1]).name for label in models]
    details = json.loads((out / "detailed_results.json").read_text())["samples"]
    made = []

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.boxplot([[1000 * d["models"][label]["latency_s"] for d in details if "latency_s" in d["models"][label]]
                for label in models], tick_labels=labels)
    ax.set_ylabel("end-to-end latency per request (ms)\n(the samples answered one at a time)")
    ax.set_title("Latency distribution")
    made.append(_save(fig, out, "latency.png", "Latency distribution"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, [m["decode_tokens_per_s"] or 0 for m in models.values()], color="#4c72b0")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode speed")
    made.append(_save(fig, out, "tokens_per_s.png", "Decode speed"))

    first = next(iter(models.values()))
    for key, title, file in (("perplexity_answer", "Answer perplexity change vs first model (%)", "ppl_delta.png"),
                             ("rougeL", "ROUGE-L change vs first model (absolute)", "rouge_delta.png")):
        if first.get(key) is None:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.5))
        if key == "perplexity_answer":
            values = [100 * (m[key] / first[key] - 1) for m in models.values()]
        else:
            values = [m[key] - first[key] for m in models.values()]
        ax.bar(labels, values, color="#dd8452")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(title)
        made.append(_save(fig, out, file, title))
    return made


def _save(fig, out: Path, name: str, title: str) -> tuple[str, str]:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return title, name
