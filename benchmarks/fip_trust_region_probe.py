r"""Probe: a per-problem step size from a trust region on the constraint's linearisation.

FIP's direction keeps the anchor outputs put *to first order*: :math:`J\,\Delta w \approx 0` on
the protected part. With too long a step (LeNet-5 at the default lr 0.4) the second-order
term takes over and the anchors' outputs move anyway. This probe measures, after every step
and on that step's own anchors :math:`x` (the same ScaledNoise batch the step protected),

.. math::

    e = F(w'; x) - F(w; x) - J\,(w' - w), \qquad
    q = \frac{\|e\|}{\eta_{\rm eff}\,\|J \nabla L\|},

the part of the anchor outputs' change that the linear model did not predict, relative to
the change an unconstrained gradient step of the same length would make to them (to first
order). Because :math:`e = O(\eta^2)` and the denominator is :math:`O(\eta)`, :math:`q` grows
linearly with the step: it is the share of the protection that the step's curvature gives
back. It is scale-free (outputs and weights) and excludes the intended output changes (the
pull-back and the damping leak are both in :math:`J\Delta w`). Built into FIP it would cost one
forward pass over the step's 32 anchors at :math:`w'` and two Jacobian-vector products with
the factored :math:`J` the step already holds; this probe takes FIP's own step unchanged and
builds that :math:`J` a second time, so its ms per step overstate the rule's cost.

Rule (Levenberg–Marquardt style, on a multiplier :math:`m` of lr, :math:`\eta_{\rm eff} = m\,\eta`):
``q > tol``: :math:`m \leftarrow m/2`; ``q < tol/2``: :math:`m \leftarrow \min(m\cdot{\rm grow}, m_{\max})`;
else hold. ``m`` scales the whole step as a smaller lr would (secondary step and the
pull-back's cap). Parameters: ``tol`` and ``grow`` (``m_max`` 1 unless set).

Runs ``fip_defaults.py``'s problems through its own functions (task A, fine-tuning grid on
the first seed, same batches), with :class:`TrustFIP` settings next to FIP's defaults.

Usage::

    PYTHONPATH=. python benchmarks/fip_trust_region_probe.py --seeds 0,1 \
        --trust "tr0.3=dict(tol=0.3)" --out /tmp/fip_trust_probe.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fip_defaults as fd  # noqa: E402

import riemfip.optim as ro  # noqa: E402
from riemfip.optim import FIP  # noqa: E402


class TrustFIP(FIP):
    """FIP whose lr is multiplied by ``m``, adapted each step from the nonlinearity ratio ``q``."""

    def __init__(
        self,
        params,
        *,
        tol=0.3,
        grow=1.1,
        m_max=1.0,
        m_min=1e-3,
        ref="grad",
        probe="secondary",
        diag=False,
        ema=0.0,
        **kwargs,
    ):
        self.tol, self.grow, self.m_max, self.m_min = float(tol), float(grow), float(m_max), m_min
        self.probe, self.diag, self.ema = probe, bool(diag), float(ema)
        self.ref = ref  # "grad": q = |e| / (lr |J grad|); "residual": q = |e| / |F(w) - F(w0)|
        self._pending = {}
        super().__init__(params, **kwargs)
        if self.curvature != ro.Exact() or self.sampling.outputs is not None:
            raise ValueError("TrustFIP: the exact curvature on all outputs only")

    def multiplier(self, gi: int = 0) -> float:
        return self.state[self._groups[gi].key].get("lr_mult", 1.0)

    def _direction(self, gi, param_group, state, w, grad, x, y0):
        # FIP's own direction at lr -> m * lr; the trust test needs the step's anchors
        mult = state.setdefault("lr_mult", 1.0)
        lr = param_group["lr"]
        param_group["lr"] = lr * mult
        try:
            secondary, correction, diag = super()._direction(gi, param_group, state, w, grad, x, y0)
        finally:
            param_group["lr"] = lr
        grad = state["momentum_buffer"] if param_group["momentum"] > 0 else grad
        self._pending[gi] = (x, y0, w, lr * mult, grad, secondary)
        return secondary, correction, diag

    def _step_group(self, gi, param_group, grad):
        info = super()._step_group(gi, param_group, grad)
        x, y0, w, lr, grad, secondary = self._pending.pop(gi)
        state = self.state[self._groups[gi].key]
        # the step's metric again (FIP's direction keeps its Jacobian to itself): one more
        # factored Jacobian of the step's anchors, the same numbers
        metric = self.step_metric(gi, x, state["damping"])
        jac = metric.jacobian_operator(w)
        if self.ref == "grad":
            ref = lr * float(jac.jvp(grad[None])[0].norm())
        else:
            ref = float((jac.embedded - self.output_metric.embed_samples(y0)).norm())
        # probe point: the secondary step alone ("secondary", what m controls: e = O(m^2),
        # ref = O(m)), or the accepted point ("total": pull-backs included, whose
        # nonlinearity does not shrink with m, so q -> infinity as m -> 0)
        if self.probe == "holdout":
            # off-constraint leak: how far the secondary step moves the outputs of stored
            # inputs this step did not protect (the held-out anchors), relative to ref
            delta = secondary
            hold = self.step_metric(gi, self._groups[gi].anchor.holdout_inputs, 0.0)
            err = hold.embed(w + secondary) - hold.embed(w)
        else:
            delta = secondary if self.probe == "secondary" else self._groups[gi].read() - w
        if ref > 0 and float(delta.norm()) > 0:
            if self.probe != "holdout":
                err = metric.embed(w + delta) - jac.embedded - jac.jvp(delta[None])[0]
            q_raw = float(err.norm()) / ref
            prev = state.get("q_ema")
            q = q_raw if prev is None or self.ema == 0 else self.ema * prev + (1 - self.ema) * q_raw
            state["q_ema"] = q
            m = state["lr_mult"]
            if q > self.tol:
                m = max(0.5 * m, self.m_min)
            elif q < 0.5 * self.tol:
                m = min(m * self.grow, self.m_max)
            state["lr_mult"] = m
            state.setdefault("q_trace", []).append(q)
            state.setdefault("m_trace", []).append(m)
            state.setdefault("e_trace", []).append(float(err.norm()))
            state.setdefault("r_trace", []).append(info.fit_residual)
            if self.diag:  # where does the secondary step move the outputs? (3 extra passes)
                batch_move = float((metric.embed(w + secondary) - jac.embedded).norm())
                fit = self.step_metric(gi, self._groups[gi].anchor.fit_inputs, 0.0)
                fit_move = float((fit.embed(w + secondary) - fit.embed(w)).norm())
                lin = float(jac.jvp(secondary[None])[0].norm())
                for k, v in (
                    ("lin_leak", lin / ref),
                    ("batch_move", batch_move / ref),
                    ("fit_move", fit_move / ref),
                ):
                    state.setdefault(k, []).append(v)
        return info


# ---------------------------------------------------------------- plumbing into fip_defaults
_ORIGINAL_RUN_TASK_B = fd.run_task_b


def _run_task_b(net, make_opt, x, y, **kw):
    made = {}

    def make(n):
        made["opt"] = make_opt(n)
        return made["opt"]

    out = _ORIGINAL_RUN_TASK_B(net, make, x, y, **kw)
    opt = made.get("opt")
    if isinstance(opt, TrustFIP):
        st = opt.state[opt._groups[0].key]
        qs, ms = st.get("q_trace", []), st.get("m_trace", [])
        out |= {
            "final_mult": ms[-1] if ms else 1.0,
            "mean_mult": statistics.fmean(ms) if ms else 1.0,
            "q_median": statistics.median(qs) if qs else math.nan,
            "q_p90": sorted(qs)[int(0.9 * (len(qs) - 1))] if qs else math.nan,
            "q_first10": statistics.fmean(qs[:10]) if qs else math.nan,
            "m_trace": ms[::5],
            **{
                k + "_median": statistics.median(st[k])
                for k in ("lin_leak", "batch_move", "fit_move")
                if st.get(k)
            },
            "q_trace": qs[::5],
            "e_trace": st.get("e_trace", [])[::5],
            "r_trace": st.get("r_trace", [])[::5],
        }
    return out


def _fip_maker(anchors, options, ft_lr):
    options = dict(fd.setting_options(options, anchors, ft_lr))
    trust = options.pop("trust", None)
    if trust is not None:  # FIP keywords given inside the trust dict go to FIP
        trust = dict(trust)
        for k in [
            k
            for k in trust
            if k not in ("tol", "grow", "m_max", "m_min", "ref", "probe", "diag", "ema")
        ]:
            options[k] = trust.pop(k)

    def make(net):
        if trust is None:
            return FIP(net.parameters(), model=net, anchor_inputs=anchors, **options)
        return TrustFIP(net.parameters(), model=net, anchor_inputs=anchors, **trust, **options)

    return make


fd.run_task_b = _run_task_b
fd.fip_maker = _fip_maker


def table(results: dict) -> str:
    lines = [
        "| problem | setting | before | old | new | FT new | both | ms/step | final m | mean m "
        "| q median | q p90 |",
        "|" + "---|" * 12,
    ]
    for name, res in results.items():
        s = res["summary"]
        for m in (k for k in s if k.startswith("fip:")):
            r = s[m]
            rows = [row[m] for row in res["seeds"].values() if m in row]

            def agg(key, rows=rows):
                v = [x[key] for x in rows if key in x]
                return f"{statistics.fmean(v):.2f}" if v else "-"

            fm = [x["final_mult"] for x in rows if "final_mult" in x]
            fms = "/".join(f"{v:.2g}" for v in fm) if fm else "-"
            lines.append(
                f"| {name} | {m[4:]} | {fd.pm(s['before'])} | {fd.pm(r['old'])} | "
                f"{fd.pm(r['new'])} | {fd.pm(s['finetune']['new'])} | {r['both']}/{r['seeds']} | "
                f"{fd.pm(r['step_ms'])} | {fms} | {agg('mean_mult')} | {agg('q_median')} | "
                f"{agg('q_p90')} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=list(fd.PROBLEMS), choices=list(fd.PROBLEMS))
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="NAME=KWARGS",
        help="TrustFIP setting: dict(tol=..., grow=..., m_max=...) plus any FIP keyword",
    )
    p.add_argument(
        "--setting", action="append", default=[], metavar="NAME=KWARGS", help="plain FIP setting"
    )
    p.add_argument("--no-defaults", action="store_true")
    p.add_argument("--out", type=Path, default=Path("/tmp/fip_trust_probe.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    variants = {} if args.no_defaults else {"defaults": {}}
    for spec in args.setting:
        head, _, expr = spec.partition("=")
        variants[head] = expr
    for spec in args.trust:
        head, _, expr = spec.partition("=")
        variants[head] = f"dict(trust={expr})"
    run_args = argparse.Namespace(
        seeds=args.seeds,
        batch=64,
        task_a="sgd",
        per_class=50,
        ft_lrs=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
        where={k: fd.ALL for k in variants},
    )
    wall = time.perf_counter()
    results = {}
    for name in args.problems:
        print(f"{name} ...", flush=True)
        results[name] = fd.run_problem(name, run_args, variants)
    record = {
        "command": "python benchmarks/fip_trust_region_probe.py " + " ".join(sys.argv[1:]),
        "variants": variants,
        "seeds": args.seeds,
        "wall_seconds": time.perf_counter() - wall,
        "problems": results,
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(table(results))
    print()
    print(fd.per_seed_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
