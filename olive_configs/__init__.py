"""Olive workflow templates (JSON) that ftl fills in.

Kept at the repo top level and shipped in the wheel as ``ftl.olive_configs`` (see pyproject.toml);
read them with :func:`ftl.olive.load_template`.
"""
