"""Variables of the whole-graph model (memfit.plan.whole): op steps, "use w comes before use u" literals,
each use's predecessor among the tensor's uses, and the time side of each use's rectangle.

Everything that the graph or the step domains decide is a Python constant, so a fixed order (window 0) gives
a model with fixed time spans: a mandatory 1-step rectangle per use and an optional gap rectangle per kept
interval. With a free order each use has one rectangle [start, s_u + 1) whose start is s_u (reloaded at u) or
the predecessor's step + 1 (kept), so no rectangle ever has zero width.
"""
from __future__ import annotations

from memfit.plan.bound import reachability
from memfit.plan.exact import _step_domains
from memfit.plan.plan_format import Graph, Placement


class UseModel:
    def __init__(self, g: Graph, m, order: list[str], window: int | None,
                 free_range: tuple[int, int] | None = None, precedes: list[tuple[str, str]] = ()) -> None:
        self.g, self.m, self.order = g, m, order
        self.pos = {o: i for i, o in enumerate(order)}
        n = len(order)
        self.fixed = window == 0 and free_range is None
        self.before_vars: dict[tuple[str, str], object] = {}
        self.keep: dict[tuple[str, str], object] = {}
        self.prev: dict[tuple[str, str], tuple[object, list[tuple[str, object]]]] = {}
        self.start: dict[tuple[str, str], object] = {}  # rectangle start variables (free order only)
        self.hint_keep: dict[tuple[str, str], int] = {}
        self.n_step_vars = 0
        if self.fixed:
            self.dom = {o: (i, i) for o, i in self.pos.items()}
            self.s: dict[str, object] = dict(self.pos)
            return
        self.anc, self.desc, self.bit = reachability(g)
        asap = _step_domains(g, order, True)
        if free_range is not None:  # ops at steps i..j-1 permute among those steps; the rest stay put
            i, j = free_range
            self.dom = {o: (max(lo, i), min(hi, j - 1)) if i <= self.pos[o] < j else (self.pos[o], self.pos[o])
                        for o, (lo, hi) in asap.items()}
        else:
            w = n if window is None else window
            self.dom = {o: (max(lo, self.pos[o] - w), min(hi, self.pos[o] + w)) for o, (lo, hi) in asap.items()}
        self.s = {}
        for o in order:
            lo, hi = self.dom[o]
            self.s[o] = lo if lo == hi else m.NewIntVar(lo, hi, f"s[{o}]")
            self.n_step_vars += lo != hi
        moving = [o for o in order if not isinstance(self.s[o], int)]
        fixed_steps = {v for v in self.s.values() if isinstance(v, int)}
        for o in moving:  # a moving op never takes a step a fixed op holds
            lo, hi = self.dom[o]
            if any(k in fixed_steps for k in range(lo, hi + 1)):
                from ortools.sat.python import cp_model

                free = [k for k in range(lo, hi + 1) if k not in fixed_steps]
                m.AddLinearExpressionInDomain(self.s[o], cp_model.Domain.FromValues(free))
        m.AddAllDifferent([self.s[o] for o in moving])
        for o in order:
            for t in g.op[o].inputs:
                p = g.tensor[t].producer
                if p is not None and not (isinstance(self.s[p], int) and isinstance(self.s[o], int)):
                    m.Add(self.s[p] + 1 <= self.s[o])
        for a, b in precedes:  # precedences the graph's tensors do not give (memfit.plan.bound_some's anchors)
            if not (isinstance(self.s[a], int) and isinstance(self.s[b], int)):
                m.Add(self.s[a] + 1 <= self.s[b])

    def uses(self, name: str) -> list[str]:
        t = self.g.tensor[name]
        return list(dict.fromkeys(([t.producer] if t.producer else []) + list(t.consumers)))

    def before(self, x: str, y: str):
        """1 if op x runs before op y in every plan of the model, 0 if never, else a literal."""
        if x == y:
            return 0
        (lx, hx), (ly, hy) = self.dom[x], self.dom[y]
        if hx < ly:
            return 1
        if hy < lx:
            return 0
        if not self.fixed:
            if self.anc[y] & self.bit[x]:
                return 1
            if self.desc[y] & self.bit[x]:
                return 0
        key = (x, y) if x < y else (y, x)
        if key not in self.before_vars:
            b = self.m.NewBoolVar(f"before[{key[0]},{key[1]}]")
            a, c = self.s[key[0]], self.s[key[1]]
            self.m.Add(a + 1 <= c).OnlyEnforceIf(b)
            self.m.Add(c + 1 <= a).OnlyEnforceIf(b.Not())
            self.before_vars[key] = b
        b = self.before_vars[key]
        return b if key == (x, y) else b.Not()

    def prev_of(self, name: str, u: str) -> tuple[object, list[tuple[str, object]]]:
        """(first, [(w, is_prev)]): whether u is the tensor's first use, and which use w directly precedes u
        (1 or a literal each; exactly one of first and the is_prev holds)."""
        key = (name, u)
        if key in self.prev:
            return self.prev[key]
        m = self.m
        cands = [(w, b) for w in self.uses(name) if w != u for b in [self.before(w, u)]
                 if not (isinstance(b, int) and b == 0)]
        if not cands:
            out: tuple[object, list] = (1, [])
        elif all(isinstance(b, int) for _, b in cands) and all(
                isinstance(self.before(w, v), int) for w, _ in cands for v, _ in cands if w != v):
            latest = [w for w, _ in cands if all(self.before(v, w) == 1 for v, _ in cands if v != w)]
            out = (0, [(latest[0], 1)])
        else:
            prevs = []
            for w, bw in cands:
                lit = m.NewBoolVar(f"prev[{name},{w},{u}]")
                if not isinstance(bw, int):
                    m.AddImplication(lit, bw)
                for v, bv in cands:  # no other use strictly between w and u
                    if v == w:
                        continue
                    bvw = self.before(v, w)
                    if isinstance(bvw, int) and bvw == 1:
                        continue
                    if isinstance(bv, int):  # v runs before u: it must run before w
                        m.AddImplication(lit, bvw) if not isinstance(bvw, int) else m.Add(lit == 0)
                    elif isinstance(bvw, int):  # bvw == 0: v must not run before u
                        m.AddImplication(lit, bv.Not())
                    else:
                        m.AddBoolOr([lit.Not(), bv.Not(), bvw])
                prevs.append((w, lit))
            if any(isinstance(b, int) for _, b in cands):
                first: object = 0
            else:
                first = m.NewBoolVar(f"first[{name},{u}]")
                for _, b in cands:
                    m.AddImplication(first, b.Not())
            m.AddExactlyOne([lit for _, lit in prevs] + ([] if isinstance(first, int) else [first]))
            out = (first, prevs)
        self.prev[key] = out
        return out

    def rectangles(self, name: str, u: str, keep, prevs: list[tuple[str, object]]) -> list:
        """Time intervals of use u's rectangle(s); constant spans when the order decides them."""
        m, su = self.m, self.s[u]
        tag = f"{name},{u}"
        if isinstance(su, int) and all(isinstance(p, int) and isinstance(self.s[w], int) for w, p in prevs):
            ivs = [m.NewFixedSizeIntervalVar(su, 1, f"x[{tag}]")]
            for w, _ in prevs:  # a single constant predecessor
                gap = su - self.s[w] - 1
                if gap > 0:
                    ivs.append(m.NewOptionalFixedSizeIntervalVar(self.s[w] + 1, gap, keep, f"gap[{tag}]"))
            return ivs
        if not prevs:
            return [m.NewIntervalVar(su, 1, su + 1, f"x[{tag}]")]
        lo = min([self.dom[w][0] + 1 for w, _ in prevs] + [self.dom[u][0]])
        start = m.NewIntVar(lo, self.dom[u][1], f"start[{tag}]")
        size = m.NewIntVar(1, self.dom[u][1] - lo + 1, f"len[{tag}]")
        self.start[(name, u)] = start
        m.Add(start == su).OnlyEnforceIf(keep.Not())
        for w, lit in prevs:
            m.Add(start == self.s[w] + 1).OnlyEnforceIf([keep] + ([] if isinstance(lit, int) else [lit]))
        return [m.NewIntervalVar(start, size, su + 1, f"x[{tag}]")]

    def break_symmetry(self, addr: dict, hint_addr: dict | None) -> None:
        """Interchangeable tensors take ordered addresses at their first use, interchangeable ops keep their
        relative order; the orientation follows the hint so the hint stays feasible."""
        groups: dict[tuple, list[str]] = {}
        for t in self.g.tensors:
            us = self.uses(t.name)
            if us:
                groups.setdefault((t.bytes, t.kind, tuple(us)), []).append(t.name)
        for (_, _, us), names in groups.items():
            if len(names) > 1:
                u0 = us[0]
                names.sort(key=lambda n: (hint_addr or {}).get((n, u0), 0))
                for a, b in zip(names, names[1:]):
                    self.m.Add(addr[(a, u0)] < addr[(b, u0)])
        if self.fixed:
            return
        ops: dict[tuple, list[str]] = {}
        for o in self.g.ops:
            outs = tuple((self.g.tensor[n].bytes, self.g.tensor[n].kind, tuple(sorted(self.g.tensor[n].consumers)))
                         for n in o.outputs)
            ops.setdefault((tuple(sorted(o.inputs)), outs), []).append(o.name)
        for names in ops.values():
            names.sort(key=self.pos.__getitem__)
            for a, b in zip(names, names[1:]):
                if not (isinstance(self.s[a], int) and isinstance(self.s[b], int)):
                    self.m.Add(self.s[a] + 1 <= self.s[b])

    def add_hint(self, placements: list[Placement], addr: dict, unit: int) -> dict:
        """Hint every variable from a valid plan under self.order; returns its (tensor, use) -> address."""
        m, pos = self.m, self.pos
        covering: dict[tuple[str, int], Placement] = {}
        for p in placements:
            for k in range(p.start, p.end + 1):
                covering[(p.tensor, k)] = p
        for o, v in self.s.items():
            if not isinstance(v, int):
                m.AddHint(v, pos[o])
        for (x, y), b in self.before_vars.items():
            m.AddHint(b, int(pos[x] < pos[y]))
        hint_addr = {}
        for (name, u), a in addr.items():
            p = covering.get((name, pos[u]))
            hint_addr[(name, u)] = p.offset // unit if p else 0
            m.AddHint(a, hint_addr[(name, u)])
        for (name, u), keep in self.keep.items():
            first, prevs = self.prev[(name, u)]
            before = [w for w in self.uses(name) if pos[w] < pos[u]]
            w = max(before, key=pos.__getitem__) if before else None
            if not isinstance(first, int):
                m.AddHint(first, int(w is None))
            for v, lit in prevs:
                if not isinstance(lit, int):
                    m.AddHint(lit, int(v == w))
            kept = w is not None and covering.get((name, pos[w])) is covering.get((name, pos[u])) is not None
            m.AddHint(keep, int(kept))
            self.hint_keep[(name, u)] = int(kept)
            if (name, u) in self.start:
                m.AddHint(self.start[(name, u)], pos[w] + 1 if kept else pos[u])
        return hint_addr

    def freeze(self, names: set[str], addr: dict, hint_addr: dict) -> None:
        """Fix the spill decisions and addresses of these tensors to the hint's."""
        for (name, u), a in addr.items():
            if name in names:
                self.m.Add(a == hint_addr[(name, u)])
                if (name, u) in self.keep:
                    self.m.Add(self.keep[(name, u)] == self.hint_keep[(name, u)])

    def extract(self, solver, addr: dict, unit: int) -> tuple[list[str], list[Placement]]:
        """The solved order and one placement per run of kept uses."""
        step = {o: (v if isinstance(v, int) else solver.Value(v)) for o, v in self.s.items()}
        order = sorted(step, key=step.__getitem__)
        placements = []
        for t in self.g.tensors:
            us = sorted(self.uses(t.name), key=step.__getitem__)
            run = None
            for u in us:
                k = self.keep.get((t.name, u), 0)
                kept = k if isinstance(k, int) else solver.BooleanValue(k)
                if run is not None and kept:
                    run[3] = step[u]
                    continue
                if run is not None:
                    placements.append(Placement(*run))
                run = [t.name, solver.Value(addr[(t.name, u)]) * unit, step[u], step[u]]
            if run is not None:
                placements.append(Placement(*run))
        return order, placements
