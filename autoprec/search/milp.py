"""The exact strategy: the plan as a mixed-integer linear program over the lowering, solved by HiGHS."""

from __future__ import annotations

import ctypes
import math
import os
import sys
from contextlib import contextmanager
from typing import Iterator, Mapping

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from autoprec.core.formats import Precision
from autoprec.core.plan import PrecisionPlan
from autoprec.search.heuristics import GreedyStrategy
from autoprec.search.problem import FP32, CompiledProblem, SearchProblem, checked_budget, fixed_error


class MilpStrategy:
    """Exact multiple-choice knapsack with cast costs, solved by HiGHS through scipy.optimize.milp.

    Variables: a binary x[u, f] per unit and allowed format, with sum_f x[u, f] = 1 and
    sum err[u, f] x[u, f] <= budget; casts are linearised exactly per cast group (see
    :meth:`_casts`): continuous "producer writes s, consumer reads d" indicators whose cast cost
    is charged once per (value, destination format). The objective therefore equals the cost
    model's plan_cost for every 0/1 assignment. Costs are scaled so the widest plan is 1e4 and the
    relative MIP gap is 1e-9: the answer is optimal to ~1e-9 of its cost. Formats that another
    format beats in cost, error and casts alike are dropped first (they cannot be in a strictly
    better plan), which shrinks the model. ``time_limit`` (seconds per HiGHS call) is a safety valve for huge
    or highly symmetric models: when it strikes, the best plan found so far is returned (still
    within budget) and the plan's notes say optimality was not proven.

    Ties in cost are common (bf16 and fp16 cost the same on every target), and a tie is where
    the profile should decide, so a second solve keeps the cost within COST_TOL of that optimum
    and minimises the predicted error: lexicographic (cost, error), deterministic.
    """

    name = "milp"
    COST_SCALE = 1e4
    COST_TOL = 1e-9

    def __init__(self, time_limit: float = 60.0, mip_rel_gap: float = 1e-9) -> None:
        self.time_limit = time_limit
        self.mip_rel_gap = mip_rel_gap

    def solve(self, problem: SearchProblem, budget: float | None = None) -> PrecisionPlan:
        b = checked_budget(problem, budget)
        c = problem.compiled
        fmt, proven = self.assign(c, b)
        notes = () if proven else (f"milp: optimality not proven within {self.time_limit:g} s; best plan found",)
        return problem.make_plan(c.to_layers(fmt), b, self.name, notes=notes)

    @staticmethod
    def options(c: CompiledProblem, budget: float) -> tuple[list[list[Precision]], float]:
        """The formats each unit may take at ``budget`` (those that fit it and no other format
        beats), and the error budget left once the pinned units are counted."""
        rem = max(0.0, budget - fixed_error(c))
        return [c.undominated(ui, [f for f in u.formats if len(u.formats) == 1 or u.error[f] <= rem])
                for ui, u in enumerate(c.units)], rem

    def assign(self, c: CompiledProblem, budget: float) -> tuple[list[Precision], bool]:
        """The optimal format per unit, and whether HiGHS proved it optimal."""
        opts, rem = self.options(c, budget)
        # HiGHS accepts a binary within 1e-6 of 0/1, so a rounded answer can overshoot the budget by
        # ~1e-6 of it: check exactly and, rarely, re-solve with the budget shaved by a margin.
        for margin in (0.0, 1e-9, 1e-6, 1e-4):
            fmt, proven = self._solve(c, opts, rem * (1 - margin))
            if c.total_error(fmt) <= budget or not math.isfinite(rem) or rem == 0:
                return fmt, proven
        return GreedyStrategy().assign(c, budget), False  # unreachable in practice; still valid

    def build(self, c: CompiledProblem, budget: float) -> tuple["_Model", dict[tuple[int, Precision], int]]:
        """The MILP at ``budget`` and its unit-format variables (for callers who inspect its size)."""
        opts, rem = self.options(c, budget)
        return self._model(c, opts, rem)

    def _model(self, c: CompiledProblem, opts: list[list[Precision]], rem: float
               ) -> tuple["_Model", dict[tuple[int, Precision], int]]:
        cscale = self.COST_SCALE / c.base_cost if c.base_cost > 0 else 1.0
        m = _Model()
        x = {(ui, f): m.var(cscale * c.units[ui].cost[f], integer=True)
             for ui, fs in enumerate(opts) if len(fs) > 1 for f in fs}
        if not x:
            return m, x
        for ui, fs in enumerate(opts):  # one format per unit
            if len(fs) > 1:
                m.row({x[(ui, f)]: 1.0 for f in fs}, 1.0, 1.0)
        if math.isfinite(rem) and any(c.units[ui].error[f] > 0 for (ui, f) in x):
            scale = rem if rem > 0 else 1.0
            m.row({i: c.units[ui].error[f] / scale for (ui, f), i in x.items()}, -np.inf, rem / scale)
        self._values(c, m, x, opts, cscale)
        return m, x

    def _solve(self, c: CompiledProblem, opts: list[list[Precision]], rem: float) -> tuple[list[Precision], bool]:
        m, x = self._model(c, opts, rem)
        if not x:
            return [fs[0] for fs in opts], True
        opt = dict(time_limit=self.time_limit, mip_rel_gap=self.mip_rel_gap)
        res = m.solve(**opt)
        if res is None:  # cannot happen (all-widest is feasible); stay safe rather than crash
            return [fs[0] for fs in opts], False
        proven = res.status == 0
        escale = sum(max(u.error.values()) for u in c.units) / 1e3 or 1.0
        err = {i: c.units[ui].error[f] / escale for (ui, f), i in x.items()}
        # second pass: least error among the (near-)cheapest plans. Only after a proven optimum: an
        # unproven one is HiGHS running out of time, and a tie-break would spend as long again.
        if proven and any(err.values()):
            m.row({i: v for i, v in enumerate(m.cost) if v}, -np.inf, res.fun + self.COST_TOL * max(abs(res.fun), 1.0))
            res = m.solve(objective=err, **opt) or res
        return [fs[0] if len(fs) == 1 else max(fs, key=lambda f: (res.x[x[(ui, f)]], -f.rank))
                for ui, fs in enumerate(opts)], proven

    @staticmethod
    def _values(c: CompiledProblem, m: "_Model", x: dict, opts: list[list[Precision]], cscale: float) -> None:
        """Charge the FOLLOW ops and the casts, exactly as the lowering has them.

        Each node's value format is an indicator form per value format (a linear expression in the
        variables, :class:`_Form`): a layer's from its unit's x; a FOLLOW op with one source of
        formats shares it; one that joins several sources takes the widest, through two
        cumulative indicators Y[fp32] ("the value is fp32") and Y[bf16] ("fp32 or bf16") with
        Y >= each input's and Y <= their sum -- exact for 0/1 inputs, and one pair per join, so the
        model grows with the graph, not with the number of layers upstream of a residual stream.
        A FOLLOW op costs follow_cost in each format times its indicator. Each cast of a value v to
        a format d that a reader wants is charged once per (v, source format, d): per reader, the
        pair "v is s, the reader reads d" is a transport block z[s, d] >= 0 whose row sums are v's
        indicators and column sums the reader's (exact for 0/1, a tight relaxation); a cast
        shared by several readers is charged through w[s, d] >= each reader's z[s, d].
        """
        vm = c.values
        forms: list[_Form] = []
        for i in range(len(vm.ops)):
            u = vm.unit[i]
            if u >= 0:
                forms.append(_Form.of_unit(u, opts[u], x))
            elif vm.follow[i] and vm.inputs[i]:
                forms.append(_Form.join([forms[j] for j in vm.inputs[i]], m, i))
            else:  # fixed: fp32, or the graph's I/O format for its floating inputs and output
                forms.append(_Form.const(vm.fixed_format[i][1]))
        for i in range(len(vm.ops)):  # FOLLOW ops in their format
            if vm.follow[i]:
                op = vm.ops[i]
                for f in forms[i].possible:
                    cost = c.p.cost_model.follow_cost(op, f)
                    if cost:
                        forms[i].charge(m, f, cscale * cost)
        for j in range(len(vm.ops)):  # casts of each value
            readers = []
            for r in vm.readers[j]:
                if vm.follow[r] and forms[r].key == forms[j].key:
                    continue  # a FOLLOW op of this one source: same format, never a cast
                if vm.unit[r] >= 0:
                    readers.append(_Form.of_unit(vm.unit[r], opts[vm.unit[r]], x, compute=True))
                else:  # a FOLLOW op in its format; the output in the I/O format; any other op fp32
                    fixed = vm.fixed_format[r][0] if vm.is_output[r] else FP32
                    readers.append(forms[r] if vm.follow[r] else _Form.const(fixed))
            if readers:
                MilpStrategy._casts(c, m, forms[j], readers, vm.elems[j], cscale)

    @staticmethod
    def _casts(c: CompiledProblem, m: "_Model", src: "_Form", readers: list["_Form"], elems: int,
               cscale: float) -> None:
        per_reader: list[dict[tuple[Precision, Precision], dict[int, float] | float]] = []
        for dst in readers:
            pairs: dict[tuple[Precision, Precision], dict[int, float] | float] = {}
            ss, ds = src.possible, dst.possible
            if len(ss) == 1 and len(ds) == 1:
                pairs[(ss[0], ds[0])] = 1.0
            elif len(ss) == 1:
                pairs.update({(ss[0], d): dst.terms[d] for d in ds})
            elif len(ds) == 1:
                pairs.update({(s, ds[0]): src.terms[s] for s in ss})
            else:
                z = {(s, d): m.var(0.0) for s in ss for d in ds}
                for s in ss:
                    m.equal({z[(s, d)]: 1.0 for d in ds}, src.terms[s])
                for d in ds:
                    m.equal({z[(s, d)]: 1.0 for s in ss}, dst.terms[d])
                pairs.update({k: {i: 1.0} for k, i in z.items()})
            per_reader.append({k: t for k, t in pairs.items() if k[0] is not k[1]})
        always = {k for pairs in per_reader for k, t in pairs.items() if _Form.is_one(t)}
        shared: dict[tuple[Precision, Precision], int] = {}
        for pairs in per_reader:
            for (s, d), terms in pairs.items():
                cost = c.p.cost_model.cast_cost(elems, s, d)
                if cost <= 0 or (s, d) in always or _Form.is_zero(terms):
                    continue
                if len(per_reader) == 1:
                    _Form.add_cost(m, terms, cscale * cost)
                    continue
                if (s, d) not in shared:
                    shared[(s, d)] = m.var(cscale * cost)
                m.at_least(shared[(s, d)], terms)


#: value formats (fp8 is never one): a value's format is one of these, widest first
VALUE_FORMATS = (FP32, Precision.BF16, Precision.FP16)


class _Form:
    """A node's value (or a reader's read) format as 0/1 indicator expressions per format.

    ``terms[f]`` is a linear expression ({variable: coefficient}, with the constant under key -1)
    that is 1 exactly when the format is f; ``possible`` lists the formats it can take; ``key``
    identifies the source so that a FOLLOW op of one source shares its form.
    """

    CONST = -1  # key of the constant term in an expression

    def __init__(self, terms: Mapping[Precision, dict[int, float]], key: tuple) -> None:
        self.terms = dict(terms)
        self.possible = sorted(self.terms, key=lambda f: f.rank)
        self.key = key

    @classmethod
    def const(cls, f: Precision) -> "_Form":
        return cls({f: {cls.CONST: 1.0}}, ("const", f))

    @classmethod
    def of_unit(cls, u: int, fmts: list[Precision], x: Mapping[tuple[int, Precision], int],
                compute: bool = False) -> "_Form":
        """Unit ``u``'s value format (``compute``: the format its layers compute and read in)."""
        if len(fmts) == 1:
            f = fmts[0] if compute else fmts[0].compute_output
            return cls({f: {cls.CONST: 1.0}}, ("unit", u, compute))
        terms: dict[Precision, dict[int, float]] = {}
        for g in fmts:
            f = g if compute else g.compute_output
            terms.setdefault(f, {})[x[(u, g)]] = 1.0
        return cls(terms, ("unit", u, compute))

    @classmethod
    def join(cls, inputs: list["_Form"], m: "_Model", node: int) -> "_Form":
        """The widest of ``inputs`` (a FOLLOW op's format)."""
        distinct = list({f.key: f for f in inputs}.values())
        if len(distinct) == 1:
            return distinct[0]
        possible = {f for form in distinct for f in form.possible}
        if all(len(form.possible) == 1 for form in distinct):
            best = FP32 if FP32 in possible else Precision.BF16 if Precision.BF16 in possible else Precision.FP16
            return cls.const(best)
        if any(form.possible == [FP32] for form in distinct):
            return cls.const(FP32)  # an fp32 input makes it fp32 whatever the others are
        cums = []
        for k in VALUE_FORMATS[:2]:  # Y[k] = 1: the value is k or wider
            wide = [g for g in VALUE_FORMATS if g.rank <= k.rank]
            parts = [cls.sum_terms(form, wide) for form in distinct]
            if all(cls.is_zero(p) for p in parts):
                cums.append({})
                continue
            y = m.var(0.0)
            for p in parts:
                m.at_least(y, p)
            m.at_most_sum(y, parts)
            cums.append({y: 1.0})
        y32, y16 = cums
        terms = {FP32: y32, Precision.BF16: cls.minus(y16, y32), Precision.FP16: cls.minus({cls.CONST: 1.0}, y16)}
        return cls({f: t for f, t in terms.items() if f in possible}, ("join", node))

    @classmethod
    def sum_terms(cls, form: "_Form", fmts: list[Precision]) -> dict[int, float]:
        out: dict[int, float] = {}
        for f in fmts:
            for i, a in form.terms.get(f, {}).items():
                out[i] = out.get(i, 0.0) + a
        return out

    @classmethod
    def minus(cls, a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
        out = dict(a)
        for i, v in b.items():
            out[i] = out.get(i, 0.0) - v
        return out

    @classmethod
    def is_one(cls, t: dict[int, float] | float) -> bool:
        return t == 1.0 or t == {cls.CONST: 1.0}

    @classmethod
    def is_zero(cls, t: dict[int, float] | float) -> bool:
        return not isinstance(t, float) and all(v == 0 for v in t.values())

    def charge(self, m: "_Model", f: Precision, cost: float) -> None:
        """Add ``cost`` times the indicator of format ``f`` to the objective."""
        _Form.add_cost(m, self.terms[f], cost)

    @classmethod
    def add_cost(cls, m: "_Model", terms: dict[int, float] | float, cost: float) -> None:
        if isinstance(terms, float):
            return  # a constant: the same for every plan
        for i, a in terms.items():
            if i != cls.CONST:
                m.cost[i] += cost * a


class _Model:
    """A small MILP builder over scipy.optimize.milp: variables in [0, 1], sparse rows."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.integer: list[bool] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []

    def var(self, cost: float, integer: bool = False) -> int:
        self.cost.append(cost)
        self.integer.append(integer)
        return len(self.cost) - 1

    def row(self, terms: dict[int, float], lo: float, hi: float) -> None:
        self.rows.append((terms, lo, hi))

    def _affine(self, lo: float, hi: float, *parts: tuple[float, dict[int, float]]) -> None:
        """lo <= sum of sign * expression <= hi, the expressions' constants (key -1) moved to the bounds."""
        terms: dict[int, float] = {}
        const = 0.0
        for sign, expr in parts:
            for i, a in expr.items():
                if i == _Form.CONST:
                    const += sign * a
                else:
                    terms[i] = terms.get(i, 0.0) + sign * a
        self.row({i: a for i, a in terms.items() if a}, lo - const, hi - const)

    def equal(self, terms: dict[int, float], expr: dict[int, float]) -> None:
        """sum(terms) == expr."""
        self._affine(0.0, 0.0, (1.0, terms), (-1.0, expr))

    def at_least(self, y: int, expr: dict[int, float]) -> None:
        """y >= expr."""
        self._affine(0.0, np.inf, (1.0, {y: 1.0}), (-1.0, expr))

    def at_most_sum(self, y: int, exprs: list[dict[int, float]]) -> None:
        """y <= the sum of ``exprs``."""
        self._affine(-np.inf, 0.0, (1.0, {y: 1.0}), *((-1.0, e) for e in exprs))

    def solve(self, objective: Mapping[int, float] | None = None, time_limit: float = 60.0,
              mip_rel_gap: float = 1e-9):
        """Solve with HiGHS; None when it found no feasible point."""
        n = len(self.cost)
        c = np.array(self.cost) if objective is None else np.array([objective.get(i, 0.0) for i in range(n)])
        data, ri, ci = [], [], []
        for r, (terms, _, _) in enumerate(self.rows):
            for i, a in sorted(terms.items()):
                data.append(a)
                ri.append(r)
                ci.append(i)
        a = csr_array((data, (ri, ci)), shape=(len(self.rows), n))
        lo = np.array([r[1] for r in self.rows])
        hi = np.array([r[2] for r in self.rows])
        # presolve off: HiGHS 1.12 prints a stray "transformNewIntegerFeasibleSolution" line to
        # stdout when it maps a presolved solution back (ERGO-Code/HiGHS#2783); these models are
        # small enough that presolve buys nothing measurable. Its sub-MIPs print it too, hence
        # the silenced stdout.
        with silenced_c_stdout():
            res = milp(c, integrality=np.array(self.integer, dtype=float), bounds=Bounds(0.0, 1.0),
                       constraints=LinearConstraint(a, lo, hi),
                       options={"mip_rel_gap": mip_rel_gap, "time_limit": time_limit, "presolve": False})
        return res if res.x is not None else None


@contextmanager
def silenced_c_stdout() -> Iterator[None]:
    """Send file descriptor 1 to the null device for the block: what C code prints there (HiGHS
    does, whatever its options) would otherwise corrupt output meant for programs, like
    ``autoprec tune --json``. Python's own prints in the block are flushed out first and then lost
    too, so the block must print nothing a user needs."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all: nothing to protect
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        _flush_c_stdio()  # C's buffer goes to the null device, not to the restored stdout
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to ask (not a POSIX platform)
        pass
