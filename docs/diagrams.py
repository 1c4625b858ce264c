"""The diagrams of the docs, drawn as SVG by code at every build (nothing is committed).

``docs/conf.py`` calls :func:`write_all`, which writes ``docs/_generated/<name>.svg`` (English) and
``<name>.zh_CN.svg`` (Chinese labels; Sphinx's ``figure_language_filename`` picks it for the Chinese
build). The pictures are computed from the code they explain, so they cannot drift from it:

- ``ring_steps``: the steps come from ``usp_npu.algorithms.schedule.ring_schedule``;
- ``mesh_2x8``: the groups come from ``usp_npu.parallel_state.mesh_rank_lists``;
- ``ulysses_all_to_all`` and ``hybrid_split``: the token positions come from
  ``usp_npu.sharding.token_indices``;
- ``packed_split``: the token positions come from ``usp_npu.packing.packed_token_indices``,
  the rule ``split_sequence(..., cu_seqlens=)`` applies.

Text stays text (SVG ``<text>``), so the browser draws the Chinese labels with its own fonts.
``python docs/diagrams.py OUT_DIR`` writes them somewhere else.
"""

from __future__ import annotations

import itertools
import sys
from html import escape
from pathlib import Path

from usp_npu.algorithms.schedule import ring_schedule
from usp_npu.kernels.base import CAUSAL
from usp_npu.packing import packed_token_indices
from usp_npu.parallel_state import mesh_rank_lists
from usp_npu.sharding import token_indices

# One colour per sequence chunk / document / group (colour-blind friendly palette).
PALETTE = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#ee8866"]

LABELS = {
    "en": {
        "before": "before: rank c holds\nsequence part c, all heads",
        "after": "after: rank c holds the whole\nsequence, head group c only",
        "rank": "rank {}",
        "a2a": "all-to-all",
        "legend_a2a": "s = sequence part, h = head group",
        "step": "step {}",
        "ring_title": "causal ring, R = {}: rows = query halves of rank i, columns = halves of K/V block j",
        "block": "block {}",
        "computed": "computed",
        "causal": "causal square",
        "node": "node {}",
        "uly": "Ulysses group (all-to-all, inside a node)",
        "ring": "ring group (crosses the nodes)",
        "mesh_title": "2 nodes x 8 devices, tp = 1, cp = 16, u = 8, r = 2",
        "seq": "sequence",
        "doc": "document {}",
        "packed_title": "packed: every document cut into 2r = {} chunks; r = {}, u = {}",
        "hybrid_title": "hybrid causal split: S = {}, u = {}, r = {}",
        "cp_rank": "CP rank {}",
    },
    "zh_CN": {
        "before": "之前：rank c 持有\n序列第 c 段、全部注意力头",
        "after": "之后：rank c 持有整条序列、\n只有第 c 组注意力头",
        "rank": "rank {}",
        "a2a": "all-to-all",
        "legend_a2a": "s = 序列段，h = 头组",
        "step": "第 {} 步",
        "ring_title": "causal 环，R = {}：行为 rank i 的两半查询，列为 K/V 块 j 的两半",
        "block": "块 {}",
        "computed": "计算",
        "causal": "causal 方块",
        "node": "节点 {}",
        "uly": "Ulysses 组（all-to-all，在节点内）",
        "ring": "环（跨节点）",
        "mesh_title": "2 节点 x 8 卡，tp = 1，cp = 16，u = 8，r = 2",
        "seq": "序列",
        "doc": "文档 {}",
        "packed_title": "打包序列：每个文档切成 2r = {} 段；r = {}，u = {}",
        "hybrid_title": "hybrid causal 切分：S = {}，u = {}，r = {}",
        "cp_rank": "CP rank {}",
    },
}


class Svg:
    """A minimal SVG canvas: rectangles, lines, polygons and text, in pixel coordinates."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.items: list[str] = []

    def rect(self, x, y, w, h, fill="none", stroke="#333", rx=0, width=1.0) -> None:
        self.items.append(
            f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="{rx}" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="{width}"/>'
        )

    def line(self, x1, y1, x2, y2, stroke="#333", width=1.0, arrow=False, dash="") -> None:
        extra = ' marker-end="url(#arrow)"' if arrow else ""
        extra += f' stroke-dasharray="{dash}"' if dash else ""
        self.items.append(
            f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{stroke}" '
            f'stroke-width="{width}"{extra}/>'
        )

    def polygon(self, points, fill) -> None:
        pts = " ".join(f"{x},{y}" for x, y in points)
        self.items.append(f'<polygon points="{pts}" fill="{fill}" stroke="none"/>')

    def text(self, x, y, s, size=12, anchor="start", color="#222", bold=False) -> None:
        weight = ' font-weight="bold"' if bold else ""
        for k, line in enumerate(s.split("\n")):  # one <text> per line: SVG does not wrap
            self.items.append(
                f'<text x="{x}" y="{y + k * (size + 3)}" font-size="{size}" '
                f'text-anchor="{anchor}" fill="{color}"{weight}>{escape(line)}</text>'
            )

    def render(self) -> str:
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
            f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" '
            'font-family="sans-serif">\n<defs><marker id="arrow" markerWidth="8" '
            'markerHeight="8" refX="7" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" '
            'fill="#333"/></marker></defs>\n<rect width="100%" height="100%" fill="white"/>\n'
        )
        return head + "\n".join(self.items) + "\n</svg>\n"


def ulysses_all_to_all(lang: str, u: int = 4) -> str:
    """Ulysses, u ranks: [S/u tokens, all heads] -> [all tokens, heads/u] on every rank."""
    t = LABELS[lang]
    cell, gap, left, top = 36, 170, 80, 56
    width = u * cell
    svg = Svg(left + 2 * width + gap + 20, top + width + 40)
    for side, x0 in enumerate([left, left + width + gap]):
        svg.text(x0 + width / 2, 16, t["before" if side == 0 else "after"], 12, "middle")
        for c in range(u):
            y = top + c * cell
            svg.text(x0 - 8, y + cell / 2 + 4, t["rank"].format(c), 12, "end")
            for col in range(u):
                # side 0: rank c holds sequence part c of every head group col;
                # side 1: rank c holds head group c of every sequence part col
                part, heads = (c, col) if side == 0 else (col, c)
                svg.rect(x0 + col * cell, y, cell, cell, PALETTE[part], "#fff", width=2)
                svg.text(
                    x0 + col * cell + cell / 2,
                    y + cell / 2 + 4,
                    f"s{part}h{heads}",
                    10,
                    "middle",
                    "#fff",
                )
    svg.text(left + width + gap / 2, top + width + 26, t["legend_a2a"], 11, "middle")
    mid_y = top + width / 2
    svg.line(left + width + 20, mid_y, left + width + gap - 50, mid_y, width=2, arrow=True)
    svg.text(left + width + gap / 2 - 15, mid_y - 8, t["a2a"], 12, "middle", bold=True)
    return svg.render()


def ring_steps(lang: str, ring_size: int = 4) -> str:
    """Causal load-balanced ring: what each (rank, step) computes, from ring_schedule."""
    t = LABELS[lang]
    box, pad_x, pad_y, left, top = 64, 56, 44, 150, 60
    svg = Svg(left + ring_size * (box + pad_x), top + ring_size * (box + pad_y) + 20)
    svg.text(10, 20, t["ring_title"].format(ring_size), 12, bold=True)
    chunks = 2 * ring_size
    for step in range(ring_size):
        svg.text(
            left + step * (box + pad_x) + box / 2,
            top - 8,
            t["step"].format(step),
            12,
            "middle",
            bold=True,
        )
    for i in range(ring_size):
        y = top + i * (box + pad_y)
        svg.text(left - 14, y + box / 2 - 4, t["rank"].format(i), 12, "end", bold=True)
        svg.text(left - 14, y + box / 2 + 12, f"q: c{i}, c{chunks - 1 - i}", 11, "end")
        for step, blk in enumerate(ring_schedule(i, ring_size, 2, causal=True)):
            x = left + step * (box + pad_x)
            half = box / 2
            q0, q1 = blk.q_rows.start, blk.q_rows.stop
            k0, k1 = blk.kv_rows.start, blk.kv_rows.stop
            colour = PALETTE[blk.source]
            if blk.mask is CAUSAL:  # own block: lower triangle of the square, diagonal included
                svg.polygon([(x, y), (x + box, y + box), (x, y + box)], colour)
            else:
                svg.rect(
                    x + k0 * half, y + q0 * half, (k1 - k0) * half, (q1 - q0) * half, colour, "none"
                )
            svg.rect(x, y, box, box)
            svg.line(x + half, y, x + half, y + box, "#999", dash="3,3")
            svg.line(x, y + half, x + box, y + half, "#999", dash="3,3")
            j = blk.source
            svg.text(
                x + box / 2,
                y + box + 14,
                f"{t['block'].format(j)}: c{j}, c{chunks - 1 - j}",
                11,
                "middle",
            )
    return svg.render()


def mesh_2x8(lang: str) -> str:
    """2 nodes x 8 devices, cp = 16, u = 8: the groups from mesh_rank_lists."""
    t = LABELS[lang]
    _, ulysses, rings = mesh_rank_lists(16, tp=1, cp=16, u=8)
    w, gap, left, top, row = 46, 10, 90, 50, 130
    svg = Svg(left + 8 * (w + gap) + 80, top + 2 * row + 60)
    svg.text(10, 20, t["mesh_title"], 13, bold=True)

    def centre(rank: int) -> tuple[float, float]:
        node, local = divmod(rank, 8)
        return left + local * (w + gap) + w / 2, top + 20 + node * row + w / 2

    for node in range(2):
        svg.text(left - 12, top + 20 + node * row + w / 2 + 4, t["node"].format(node), 12, "end")
    for g, members in enumerate(ulysses):
        xs = [centre(r)[0] for r in members]
        ys = [centre(r)[1] for r in members]
        svg.rect(
            min(xs) - w / 2 - 4,
            min(ys) - w / 2 - 4,
            max(xs) - min(xs) + w + 8,
            max(ys) - min(ys) + w + 8,
            "none",
            PALETTE[g],
            rx=8,
            width=2.5,
        )
    for g, members in enumerate(rings):
        for a, b in itertools.pairwise(members):
            (x1, y1), (x2, y2) = centre(a), centre(b)
            svg.line(x1, y1 + w / 2 + 4, x2, y2 - w / 2 - 4, PALETTE[2 + g % 6], 2, dash="5,3")
    for rank in range(16):
        x, y = centre(rank)
        svg.rect(x - w / 2, y - w / 2, w, w, "#f4f4f4", "#333", rx=4)
        svg.text(x, y + 5, str(rank), 14, "middle")
    legend_y = top + 2 * row + 30
    svg.rect(left, legend_y - 11, 22, 14, "none", PALETTE[0], rx=4, width=2.5)
    svg.text(left + 30, legend_y, t["uly"], 12)
    svg.line(
        left + 250 + 20, legend_y - 16, left + 250 + 20, legend_y + 4, PALETTE[2], 2, dash="5,3"
    )
    svg.text(left + 250 + 30, legend_y, t["ring"], 12)
    return svg.render()


def _token_rows(svg: Svg, t: dict, held: list[list[int]], colour_of, top: int) -> None:
    """One row per CP rank: the positions it holds, coloured, in the order it holds them."""
    cell, left = 22, 100
    for c, positions in enumerate(held):
        y = top + c * (cell + 8)
        svg.text(left - 10, y + cell / 2 + 4, t["cp_rank"].format(c), 12, "end")
        for k, p in enumerate(positions):
            svg.rect(left + k * cell, y, cell, cell, colour_of(p), "#fff", width=1.5)
            svg.text(left + k * cell + cell / 2, y + cell / 2 + 4, str(p), 10, "middle", "#fff")


def _sequence_bar(svg: Svg, t: dict, total: int, colour_of, y: int) -> None:
    cell, left = 22, 100
    svg.text(left - 10, y + cell / 2 + 4, t["seq"], 12, "end")
    for p in range(total):
        svg.rect(left + p * cell, y, cell, cell, colour_of(p), "#fff", width=1.5)
        svg.text(left + p * cell + cell / 2, y + cell / 2 + 4, str(p), 10, "middle", "#fff")


def hybrid_split(lang: str, seq: int = 16, u: int = 2, r: int = 2) -> str:
    """Causal hybrid split of one sequence, from usp_npu.sharding.token_indices."""
    t = LABELS[lang]
    chunk = seq // (2 * r)
    held = [token_indices(seq, c, u, r, causal=True).tolist() for c in range(u * r)]
    svg = Svg(100 + seq * 22 + 20, 80 + u * r * 30 + 20)
    svg.text(10, 20, t["hybrid_title"].format(seq, u, r), 13, bold=True)
    _sequence_bar(svg, t, seq, lambda p: PALETTE[p // chunk], 36)
    _token_rows(svg, t, held, lambda p: PALETTE[p // chunk], 80)
    return svg.render()


def packed_split(
    lang: str, cu_seqlens: tuple[int, ...] = (0, 8, 24), u: int = 2, r: int = 2
) -> str:
    """Two packed documents (8 and 16 tokens) on cp = u * r = 4 ranks (docs/packed.md's example)."""
    t = LABELS[lang]
    total = cu_seqlens[-1]
    held = [packed_token_indices(cu_seqlens, c, u, r, causal=True).tolist() for c in range(u * r)]

    def colour(p: int) -> str:  # documents in shades: doc d, chunk k -> palette entry
        doc = max(d for d in range(len(cu_seqlens) - 1) if cu_seqlens[d] <= p)
        size = (cu_seqlens[doc + 1] - cu_seqlens[doc]) // (2 * r)
        return PALETTE[(p - cu_seqlens[doc]) // size + 4 * doc]

    svg = Svg(100 + total * 22 + 20, 110 + u * r * 30 + 20)
    svg.text(10, 20, t["packed_title"].format(2 * r, r, u), 13, bold=True)
    for d, (start, end) in enumerate(itertools.pairwise(cu_seqlens)):
        svg.text(100 + (start + end) / 2 * 22, 44, t["doc"].format(d), 12, "middle")
    _sequence_bar(svg, t, total, colour, 54)
    _token_rows(svg, t, held, colour, 100)
    return svg.render()


DIAGRAMS = {
    "ulysses_all_to_all": ulysses_all_to_all,
    "ring_steps": ring_steps,
    "mesh_2x8": mesh_2x8,
    "hybrid_split": hybrid_split,
    "packed_split": packed_split,
}


def write_all(out_dir: Path) -> list[Path]:
    """Write every diagram in every language (only files whose text changed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in DIAGRAMS.items():
        for lang in LABELS:
            path = out_dir / (f"{name}.svg" if lang == "en" else f"{name}.{lang}.svg")
            text = draw(lang)
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_generated")):
        print(p)
