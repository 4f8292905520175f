"""The report: results per row and contender, medians and ratios, the markdown table and
the plot."""

from __future__ import annotations

import statistics
from pathlib import Path

from contenders import PAIRS
from harness import DASH, TIMES
from measurements import ROWS, applies

# ---- the run --------------------------------------------------------------------------------


class Results:
    def __init__(self, contenders: list[str]) -> None:
        self.contenders = contenders
        self.values: dict[str, dict[str, list[float]]] = {
            k: {c: [] for c in contenders} for k, *_ in ROWS
        }
        self.extra: dict[str, dict[str, list[float]]] = {}
        self.errors: list[str] = []
        self.came_up: set[tuple[str, int]] = set()  # (contender, MTU) that started
        self.no_v6: set[str] = set()  # came up without IPv6: "n/a" in the IPv6 rows

    def add(self, row: str, contender: str, value: float) -> None:
        self.values[row][contender].append(value)

    def add_extra(self, key: str, contender: str, value: float) -> None:
        self.extra.setdefault(key, {}).setdefault(contender, []).append(value)

    def summary(self) -> dict:
        out = {}
        for key, label, unit, better, _mtu in ROWS:
            row = {"label": label, "unit": unit, "better": better, "contenders": {}}
            if key.startswith("tcp6_"):
                row["left_out"] = sorted(c for c in self.no_v6 if not self.values[key].get(c))
            for c, vals in self.values[key].items():
                row["contenders"][c] = {
                    "values": vals,
                    "median": statistics.median(vals) if vals else None,
                    "min": min(vals) if vals else None,
                    "max": max(vals) if vals else None,
                }
            nf = row["contenders"].get("netferry", {}).get("median")
            row["netferry_ratio"] = {
                c: (nf / v["median"] if nf is not None and v["median"] else None)
                for c, v in row["contenders"].items()
                if c != "netferry"
            }
            row["pair_ratio"] = {}
            for a, b in PAIRS:
                ma = row["contenders"].get(a, {}).get("median")
                mb = row["contenders"].get(b, {}).get("median")
                row["pair_ratio"][f"{a} ÷ {b}"] = ma / mb if ma is not None and mb else None
            out[key] = row
        return out


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}{TIMES}"


def markdown_table(summary: dict, contenders: list[str], keys: set[str] | None = None) -> str:
    others = [c for c in contenders if c != "netferry"]
    head = ["row", "unit"] + [f"{c} median (min{DASH}max)" for c in contenders]
    if "netferry" in contenders:
        head += [f"netferry ÷ {c}" for c in others]
    pairs = [f"{a} ÷ {b}" for a, b in PAIRS if a in contenders and b in contenders]
    head += pairs
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, *_ in ROWS:
        if keys is not None and key not in keys:
            continue
        row = summary[key]
        cells = [row["label"], row["unit"] + (" ↑" if row["better"] == "higher" else " ↓")]
        left_out = set(row.get("left_out", ()))

        def na(c: str, key: str = key, left_out: set[str] = left_out) -> bool:
            return not applies(key, c) or c in left_out

        for c in contenders:
            s = row["contenders"][c]
            if na(c):
                cells.append("n/a")
            elif s["median"] is None:
                cells.append("—")
            elif len(s["values"]) == 1:
                cells.append(fmt(s["median"]))
            else:
                cells.append(f"{fmt(s['median'])} ({fmt(s['min'])}{DASH}{fmt(s['max'])})")
        if "netferry" in contenders:
            for c in others:
                r = row["netferry_ratio"].get(c)
                cells.append("n/a" if na(c) or na("netferry") else fmt_ratio(r))
        for pair in pairs:
            r = row["pair_ratio"].get(pair)
            cells.append("n/a" if any(na(c) for c in pair.split(" ÷ ")) else fmt_ratio(r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, contenders: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, *_ in ROWS]
    ncols = 4
    nrows = (len(keys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.6 * nrows))
    colors = {
        "netferry": "#d95f02",
        "netferry-vm": "#e6ab02",
        "gvproxy": "#666666",
        "slirp4netns": "#7570b3",
        "pasta": "#1b9e77",
        "netferry-slirp4netns": "#e7298a",
    }
    for ax, key in zip(axes.flat, keys, strict=False):
        row = summary[key]
        meds, los, his, names = [], [], [], []
        for c in contenders:
            s = row["contenders"][c]
            m = s["median"] if s["median"] is not None else 0.0
            meds.append(m)
            los.append(m - (s["min"] if s["min"] is not None else m))
            his.append((s["max"] if s["max"] is not None else m) - m)
            names.append(c)
        ys = range(len(names))
        ax.barh(ys, meds, xerr=[los, his], color=[colors.get(n, "grey") for n in names], capsize=3)
        ax.set_yticks(list(ys), names, fontsize=8)
        ax.invert_yaxis()
        arrow = "higher is better" if row["better"] == "higher" else "lower is better"
        ax.set_title(f"{row['label']}\n{row['unit']}, {arrow}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        right = max((m + h for m, h in zip(meds, his, strict=False)), default=0.0) or 1.0
        ax.set_xlim(0, right * 1.3)
        for y, m, h in zip(ys, meds, his, strict=False):
            ax.text(m + h + right * 0.02, y, fmt(m), va="center", fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
