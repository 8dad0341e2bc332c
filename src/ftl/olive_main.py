"""``python -m ftl.olive_main run --config …``: Olive's own CLI (``python -m olive``), minus its telemetry exporter.

Olive 0.13 builds its OneCollector exporter before it checks ``CI``, and its CLI flushes it on exit:
with no route to the collector that flush retries for about 12 s after every workflow, with
CI=1 and OLIVE_DISABLE_TELEMETRY=1 set (measured: a 4-step finetune, 34 s → 22 s). Here the
exporter is never built, so nothing is sent and nothing waits. Everything else is ``olive run``.
Can go when Olive checks its switches before building the exporter.
"""

from olive.telemetry import telemetry

telemetry.Telemetry._create_logger = lambda self: None  # no exporter: nothing to send or to flush on exit

if __name__ == "__main__":
    from olive.cli.launcher import main

    main(called_as_console_script=False)
