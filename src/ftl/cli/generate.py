"""``ftl generate`` and ``ftl chat``."""

from __future__ import annotations

from pathlib import Path

import click

from ftl.cli.base import build, emit, json_option, option
from ftl.generate.config import GenerateConfig as C
from ftl.progress import console


def _sampling(f):
    for decorator in reversed([
        option(C, "max_new_tokens", "--max-new-tokens", type=int),
        option(C, "temperature", "--temperature", type=float),
        option(C, "top_p", "--top-p", type=float),
        option(C, "repetition_penalty", "--repetition-penalty", type=float),
        option(C, "no_repeat_ngram_size", "--no-repeat-ngram-size", type=int),
        option(C, "system_prompt", "--system-prompt"),
        option(C, "adapter", "--adapter", type=click.Path(exists=True, path_type=Path)),
        option(C, "threads", "--threads", type=int),
    ]):
        f = decorator(f)
    return f


def _model(config):
    from ftl.generate import OnnxChatModel

    return OnnxChatModel(config.model_dir, adapter=config.adapter, system_prompt=config.system_prompt,
                         threads=config.threads)


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("prompt")
@_sampling
@json_option
def generate(prompt: str, as_json: bool, **options) -> None:
    """Answer PROMPT with an exported model, streaming tokens as they come."""
    config = build(C, **options)
    model = _model(config)
    messages = model.format.conversation(prompt)
    if as_json:
        result = model.generate(messages, **config.sampling())
        emit({**vars(result), "decode_tokens_per_s": result.decode_tokens_per_s, "threads": model.threads},
             True, print)
        return
    stats: dict = {}
    for piece in model.stream(messages, stats=stats, **config.sampling()):
        click.echo(piece, nl=False)
    click.echo()
    _print_speed(stats)


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@_sampling
def chat(**options) -> None:
    """A multi-turn chat in the terminal. /reset clears the history, /exit or Ctrl-D quits.

    When the history outgrows the model's context, the oldest turns are dropped, and ftl says so.
    """
    config = build(C, **options)
    model = _model(config)
    sampling = config.sampling()
    history = model.format.conversation("")[:-1]
    console.print(f"[dim]chatting with {config.model_dir} ({model.context_length}-token context) — /reset, "
                  "/exit[/]")
    while True:
        try:
            line = click.prompt(click.style("you", bold=True), prompt_suffix="> ")
        except (EOFError, click.Abort):
            click.echo()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = model.format.conversation("")[:-1]
            continue
        history, dropped = model.fit(history + [{"role": "user", "content": line}], sampling["max_new_tokens"])
        if dropped:
            console.print(f"[yellow]note:[/] dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit "
                          f"the {model.context_length}-token context")
        click.echo(click.style("model> ", bold=True), nl=False)
        stats: dict = {}
        answer = "".join(_echo(piece) for piece in model.stream(history, stats=stats, **sampling))
        click.echo()
        _print_speed(stats)
        history.append({"role": "assistant", "content": answer})


def _echo(piece: str) -> str:
    click.echo(piece, nl=False)
    return piece


def _print_speed(stats: dict) -> None:
    from ftl.system import decode_rate

    if stats.get("new_tokens"):
        rate = decode_rate(stats["new_tokens"], stats["ttft_s"], stats["total_s"])
        speed = f", {rate:.0f} tok/s" if rate else ""
        console.print(f"[dim]{stats['new_tokens']} tokens from a {stats['prompt_tokens']}-token prompt, first after "
                      f"{stats['ttft_s'] * 1000:.0f} ms{speed}[/]", highlight=False)
