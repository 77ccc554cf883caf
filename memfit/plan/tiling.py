"""Tile operators whose working set does not fit the scratchpad, as an accelerator compiler does.

An op that needs more than the scratchpad is split into k tiles (k a power of two): tile i reads the i-th
k-th of each activation/input it reads and writes the i-th k-th of each output, and reads every weight whole
(so a weight is reloaded per tile unless it stays resident). A tensor touched by tiled ops is stored as k_t
pieces, k_t the largest k among them; since every k is a power of two, tile i of an op with k tiles reads the
k_t/k consecutive pieces of block i, and an untiled op reads all pieces. Piece sizes round up, so a tiled
graph never has fewer bytes than the original.

This is row tiling of the op's output without halos: a 3x3 convolution really reads one extra input row at
each tile border (about 2/rows_per_tile more input bytes). It also tiles ops whose rows are not independent
(a global pool: tiles then hold partial sums), which the byte count treats the same way.
"""
from __future__ import annotations

from memfit.plan.errors import InfeasibleScratchpadError
from memfit.plan.plan_format import Graph, OpSpec, TensorSpec, build_graph


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _tile_ws(g: Graph, op: OpSpec, k: int, pieces: dict[str, int]) -> int:
    """Bytes resident for one tile of `op` split k ways (tensor t in pieces[t] >= k pieces)."""
    total = 0
    for n in set(op.inputs) | set(op.outputs):
        t = g.tensor[n]
        if t.kind == "weight":
            total += t.bytes
        else:
            p = max(pieces.get(n, 1), k)
            total += _ceil(t.bytes, p) * (p // k)
    return total


def tiles_needed(g: Graph, capacity: int, max_tiles: int = 1024) -> dict[str, int]:
    """Op -> tile count (power of two) for every op whose working set exceeds `capacity`."""
    tiles: dict[str, int] = {}
    pieces: dict[str, int] = {}
    changed = True
    while changed:  # more pieces of a shared tensor never grow a tile, so this settles
        changed = False
        for op in g.ops:
            k = tiles.get(op.name, 1)
            while _tile_ws(g, op, k, pieces) > capacity:
                k *= 2
                if k > max_tiles:
                    weights = sum(g.tensor[n].bytes for n in set(op.inputs) if g.tensor[n].kind == "weight")
                    raise InfeasibleScratchpadError(op.name, weights + 1 if weights >= capacity else
                                                    _tile_ws(g, op, max_tiles, pieces), capacity)
            if k > tiles.get(op.name, 1):
                tiles[op.name] = k
                changed = True
                for n in set(op.inputs) | set(op.outputs):
                    if g.tensor[n].kind != "weight":
                        pieces[n] = max(pieces.get(n, 1), k)
    return tiles


def tile_graph(g: Graph, capacity: int, max_tiles: int = 1024) -> tuple[Graph, dict[str, int]]:
    """The graph with oversized ops tiled (unchanged if every op fits) and the op -> tile count map."""
    tiles = tiles_needed(g, capacity, max_tiles)
    if not tiles:
        return g, {}
    pieces: dict[str, int] = {}
    for name, k in tiles.items():
        o = g.op[name]
        for n in set(o.inputs) | set(o.outputs):
            if g.tensor[n].kind != "weight":
                pieces[n] = max(pieces.get(n, 1), k)

    def names(n: str, block: int = 0, of: int = 1) -> list[str]:
        p = pieces.get(n, 1)
        if p == 1:
            return [n]
        per = p // of  # pieces of block `block` when the reader has `of` tiles
        return [f"{n}@{i}" for i in range(block * per, (block + 1) * per)]

    tensors = []
    for t in g.tensors:
        p = pieces.get(t.name, 1)
        tensors += [TensorSpec(n, _ceil(t.bytes, p), t.kind) for n in names(t.name)]
    ops = []
    for o in g.ops:
        k = tiles.get(o.name, 1)
        for i in range(k):
            ins = [m for n in o.inputs for m in (names(n) if g.tensor[n].kind == "weight" else names(n, i, k))]
            outs = [m for n in o.outputs for m in names(n, i, k)]
            ops.append(OpSpec(o.name if k == 1 else f"{o.name}@{i}", ins, outs, o.type))
    return build_graph(f"{g.model}[tiled]", tensors, ops), tiles
