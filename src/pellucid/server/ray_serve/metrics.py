"""The /metrics page of several engine replicas as one (the relay's GET /metrics)."""

from __future__ import annotations


def merge_metrics(pages: dict[str, str]) -> str:
    """Prometheus pages of several replicas as one: each family once, samples labelled replica="NAME"."""
    families: dict[str, list[str]] = {}  # family -> HELP/TYPE lines
    samples: dict[str, list[str]] = {}
    for name, page in pages.items():
        family = ""
        for line in page.splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                family = parts[2] if len(parts) > 2 else family
                if family not in samples:
                    families.setdefault(family, []).append(line)
                elif len(families[family]) < 2 and line not in families[family]:
                    families[family].append(line)
                continue
            if not line:
                continue
            metric, _, value = line.rpartition(" ")
            label = f'replica="{name}"'
            metric = metric.replace("{", "{" + label + ",", 1) if "{" in metric else f"{metric}{{{label}}}"
            samples.setdefault(family, []).append(f"{metric} {value}")
        for family in families:
            samples.setdefault(family, [])
    out = ["# HELP pellucid_replicas Engine replicas that answered this scrape.", "# TYPE pellucid_replicas gauge",
           f"pellucid_replicas {len(pages)}"]  # fmt: skip
    for family, head in families.items():
        out += head + samples[family]
    return "\n".join(out) + "\n"
