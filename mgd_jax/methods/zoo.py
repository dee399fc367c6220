"""The baseline distillation methods (SPEC_BASELINES §2): one small class each.

A method reads the student's and teacher's feature lists, owns auxiliary variables (``params`` trained with the
student; ``state``: BatchNorm statistics, CRD memory, frozen modules) and returns ``(loss, new_state)``.
Methods with an init stage (abound, factor, fsp) also define ``init_loss`` (SPEC_BASELINES §3).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.methods import functional as F
from mgd_jax.methods import modules as M
from mgd_jax.methods.base import Method, MethodPairError, Outputs
from mgd_jax.methods.crd import crd_step_loss
from mgd_jax.models.layers import Linear


def _maps(o: Outputs):
    return o.features[1:-1]


def _per_layer_init(make, key, pairs):
    keys = jax.random.split(key, max(len(pairs), 1))
    return {f"layer{i}": make(i, s, t).init(k, s)["params"] for i, ((s, t), k) in enumerate(zip(pairs, keys))}


@dataclasses.dataclass(frozen=True)
class Hint(Method):
    """FitNet: ConvReg(student feat[hint_layer]) regressed onto teacher feat[hint_layer] (MSE)."""

    name: str = "hint"
    hint_layer: int = 2

    def _reg(self, t):
        return M.ConvReg(t.shape[-1], t.shape[1], t.shape[2])

    def check_pair(self, s_arch, t_arch, s, t):
        hs, ht = s.features[self.hint_layer].shape[1], t.features[self.hint_layer].shape[1]
        if not (hs == 2 * ht or 2 * hs == ht or hs >= ht):
            raise MethodPairError(f"method 'hint' cannot pair {t_arch} -> {s_arch}: student map {hs}x{hs} "
                                  f"cannot be regressed to the teacher's {ht}x{ht}")

    def init(self, key, s, t, ctx=None):
        fs, ft = s.features[self.hint_layer], t.features[self.hint_layer]
        v = self._reg(ft).init(key, fs, False)
        return {"params": v["params"], "state": {"batch_stats": v["batch_stats"]}}

    def loss(self, variables, s, t, batch, train):
        fs, ft = s.features[self.hint_layer], t.features[self.hint_layer]
        out, upd = self._reg(ft).apply({"params": variables["params"], **variables["state"]}, fs, train,
                                       mutable=["batch_stats"])
        return F.hint_mse(out, ft), {"batch_stats": upd["batch_stats"]}


@dataclasses.dataclass(frozen=True)
class Attention(Method):
    """AT: squared differences of l2-normalised attention maps, summed over feat[1:-1]."""

    name: str = "attention"

    def loss(self, variables, s, t, batch, train):
        return sum(F.attention(_maps(s), _maps(t))), variables.get("state", {})


@dataclasses.dataclass(frozen=True)
class Similarity(Method):
    """SP: batch similarity matrices of the last conv maps."""

    name: str = "similarity"

    def loss(self, variables, s, t, batch, train):
        return F.similarity(s.features[-2], t.features[-2]), variables.get("state", {})


@dataclasses.dataclass(frozen=True)
class Correlation(Method):
    """CC (the authors' variant): both pooled features through trainable Linear(d -> 128) embeddings."""

    name: str = "correlation"
    feat_dim: int = 128

    def init(self, key, s, t, ctx=None):
        k1, k2 = jax.random.split(key)
        lin = Linear(self.feat_dim)
        return {"params": {"embed_s": lin.init(k1, s.features[-1])["params"],
                           "embed_t": lin.init(k2, t.features[-1])["params"]}, "state": {}}

    def loss(self, variables, s, t, batch, train):
        lin = Linear(self.feat_dim)
        p = variables["params"]
        return F.correlation(lin.apply({"params": p["embed_s"]}, s.features[-1]),
                             lin.apply({"params": p["embed_t"]}, t.features[-1])), {}


@dataclasses.dataclass(frozen=True)
class VID(Method):
    """VID: per layer of feat[1:-1], a 1x1-conv regressor and per-channel variance (Gaussian likelihood)."""

    name: str = "vid"

    def init(self, key, s, t, ctx=None):
        pairs = [F.match_hw(a, b) for a, b in zip(_maps(s), _maps(t))]
        return {"params": _per_layer_init(lambda i, a, b: M.VIDRegressor(b.shape[-1], F.VID_LOG_SCALE_INIT), key,
                                          pairs), "state": {}}

    def loss(self, variables, s, t, batch, train):
        total = 0.0
        for i, (a, b) in enumerate(zip(_maps(s), _maps(t))):
            a, b = F.match_hw(a, b)
            mu, log_scale = M.VIDRegressor(b.shape[-1], F.VID_LOG_SCALE_INIT).apply(
                {"params": variables["params"][f"layer{i}"]}, a)
            total = total + F.vid_layer(mu, b, log_scale)
        return total, {}


@dataclasses.dataclass(frozen=True)
class CRD(Method):
    """CRD with memory banks in the train state; the data path supplies index and contrast_idx."""

    name: str = "crd"
    needs_contrast: bool = True
    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.07
    nce_m: float = 0.5
    mode: str = "exact"  # positive = the sample itself ('exact') or a random same-class sample ('relax')

    def init(self, key, s, t, ctx=None):
        n_data = int(ctx["num_train"])
        k1, k2, k3, k4 = jax.random.split(key, 4)
        emb = M.CRDEmbed(self.feat_dim)
        bound = 1.0 / (self.feat_dim / 3) ** 0.5
        return {"params": {"embed_s": emb.init(k1, s.features[-1])["params"],
                           "embed_t": emb.init(k2, t.features[-1])["params"]},
                "state": {"memory_v1": jax.random.uniform(k3, (n_data, self.feat_dim), jnp.float32, -bound, bound),
                          "memory_v2": jax.random.uniform(k4, (n_data, self.feat_dim), jnp.float32, -bound, bound),
                          "z_v1": jnp.float32(-1.0), "z_v2": jnp.float32(-1.0)}}

    def loss(self, variables, s, t, batch, train):
        st = variables["state"]
        return crd_step_loss(variables["params"], st, s.features[-1], t.features[-1], batch["index"],
                             batch["contrast_idx"], feat_dim=self.feat_dim, n_data=st["memory_v1"].shape[0],
                             temperature=self.nce_t, momentum=self.nce_m)


@dataclasses.dataclass(frozen=True)
class RKD(Method):
    name: str = "rkd"
    w_dist: float = 25.0
    w_angle: float = 50.0

    def loss(self, variables, s, t, batch, train):
        return F.rkd(s.features[-1], t.features[-1], self.w_dist, self.w_angle), {}


@dataclasses.dataclass(frozen=True)
class PKT(Method):
    name: str = "pkt"

    def loss(self, variables, s, t, batch, train):
        return F.pkt(s.features[-1], t.features[-1]), {}


@dataclasses.dataclass(frozen=True)
class NST(Method):
    name: str = "nst"

    def loss(self, variables, s, t, batch, train):
        return sum(F.nst(_maps(s), _maps(t))), {}


def _require_equal_channels(name, s_arch, t_arch, s_maps, t_maps, square=False, spatial=False):
    if len(s_maps) != len(t_maps):
        raise MethodPairError(f"method {name!r} cannot pair {t_arch} -> {s_arch}: {len(t_maps)} teacher maps vs "
                              f"{len(s_maps)} student maps")
    for i, (a, b) in enumerate(zip(s_maps, t_maps)):
        if a.shape[-1] != b.shape[-1]:
            raise MethodPairError(f"method {name!r} cannot pair {t_arch} -> {s_arch}: layer {i} has {b.shape[-1]} "
                                  f"teacher channels but {a.shape[-1]} student channels")
        if spatial and a.shape[1:3] != b.shape[1:3]:
            raise MethodPairError(f"method {name!r} cannot pair {t_arch} -> {s_arch}: layer {i} is "
                                  f"{b.shape[1]}x{b.shape[2]} in the teacher but {a.shape[1]}x{a.shape[2]} in the "
                                  f"student")
        if square and (a.shape[1] != a.shape[2] or b.shape[1] != b.shape[2]):
            raise MethodPairError(f"method {name!r} cannot pair {t_arch} -> {s_arch}: layer {i} maps are not square")


@dataclasses.dataclass(frozen=True)
class KDSVD(Method):
    """KDSVD (k = 1), canonical singular-vector signs (the reference's LAPACK signs are arbitrary)."""

    name: str = "kdsvd"

    def check_pair(self, s_arch, t_arch, s, t):
        _require_equal_channels(self.name, s_arch, t_arch, _maps(s), _maps(t), square=True)

    def loss(self, variables, s, t, batch, train):
        return sum(F.kdsvd(_maps(s), _maps(t))), {}


@dataclasses.dataclass(frozen=True)
class AFD(Method):
    """AFD: per layer of feat[1:-1], teacher-driven channel attention over normalised map differences."""

    name: str = "afd"
    att_f: float = 1.0

    def check_pair(self, s_arch, t_arch, s, t):
        _require_equal_channels(self.name, s_arch, t_arch, _maps(s), _maps(t), spatial=True)

    def init(self, key, s, t, ctx=None):
        keys = jax.random.split(key, len(_maps(t)))
        return {"params": {f"layer{i}": M.AFDAttention(b.shape[-1], self.att_f).init(k, b)["params"]
                           for i, (b, k) in enumerate(zip(_maps(t), keys))}, "state": {}}

    def loss(self, variables, s, t, batch, train):
        total = 0.0
        for i, (a, b) in enumerate(zip(_maps(s), _maps(t))):
            rho = M.AFDAttention(b.shape[-1], self.att_f).apply({"params": variables["params"][f"layer{i}"]}, b)
            total = total + F.afd(a, b, rho)
        return total, {}


# --- methods with an init stage -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FSP(Method):
    """FSP: the init stage trains the student's feature layers on FSP matrices of feat[:-1]; no main-stage term."""

    name: str = "fsp"
    init_trains_student: bool = True

    def check_pair(self, s_arch, t_arch, s, t):
        _require_equal_channels(self.name, s_arch, t_arch, s.features[:-1], t.features[:-1])

    def init_loss(self, variables, s, t, train):
        return sum(F.fsp(s.features[:-1], t.features[:-1])), variables["state"]


@dataclasses.dataclass(frozen=True)
class AB(Method):
    """AB: the init stage trains connectors + the student's feature layers (preact maps); no main-stage term."""

    name: str = "abound"
    init_params_key: str = "connector"
    teacher_preact: bool = True
    init_student_preact: bool = True
    init_trains_student: bool = True

    def _connector(self, a, b):
        if a.shape[-1] == b.shape[-1] and a.shape[1] == b.shape[1]:
            return None
        return M.ConvReg(b.shape[-1], b.shape[1], b.shape[2], use_relu=False)

    def check_pair(self, s_arch, t_arch, s, t):
        for a, b in zip(_maps(s), _maps(t)):
            hs, ht = a.shape[1], b.shape[1]
            if not (hs == 2 * ht or 2 * hs == ht or hs >= ht):
                raise MethodPairError(f"method 'abound' cannot pair {t_arch} -> {s_arch}: a {hs}x{hs} student map "
                                      f"cannot be connected to a {ht}x{ht} teacher map")

    def init(self, key, s, t, ctx=None):
        params, stats = {}, {}
        for i, (a, b) in enumerate(zip(_maps(s), _maps(t))):
            c = self._connector(a, b)
            if c is not None:
                v = c.init(jax.random.fold_in(key, i), a, False)
                params[f"layer{i}"], stats[f"layer{i}"] = v["params"], v["batch_stats"]
        # connectors are trained in the init stage only: in the main stage they are frozen state
        return {"params": {}, "state": {"connector": params, "batch_stats": stats}, "init_params": params}

    def init_loss(self, variables, s, t, train):
        outs, new_stats = [], {}
        for i, (a, b) in enumerate(zip(_maps(s), _maps(t))):
            c = self._connector(a, b)
            if c is None:
                outs.append(a)
                continue
            o, upd = c.apply({"params": variables["params"][f"layer{i}"],
                              "batch_stats": variables["state"]["batch_stats"][f"layer{i}"]}, a, train,
                             mutable=["batch_stats"])
            outs.append(o)
            new_stats[f"layer{i}"] = upd["batch_stats"]
        return sum(F.ab(outs, _maps(t))), {**variables["state"], "batch_stats": new_stats}


@dataclasses.dataclass(frozen=True)
class Factor(Method):
    """FT: the init stage trains the paraphraser (reconstruction of teacher feat[-2]); the main stage trains the
    translator to match the frozen paraphraser's factors."""

    name: str = "factor"
    init_params_key: str = "paraphraser"
    init_trains_student: bool = False

    def init(self, key, s, t, ctx=None):
        k1, k2 = jax.random.split(key)
        para = M.Paraphraser().init(k1, t.features[-2])["params"]
        tr = M.Translator(t.features[-2].shape[-1]).init(k2, s.features[-2], False)
        return {"params": {"translator": tr["params"]},
                "state": {"paraphraser": para, "batch_stats": tr["batch_stats"]}, "init_params": para}

    def init_loss(self, variables, s, t, train):
        _, rec = M.Paraphraser().apply({"params": variables["params"]}, t.features[-2])
        return jnp.mean(jnp.square(rec - t.features[-2])), variables["state"]

    def loss(self, variables, s, t, batch, train):
        st = variables["state"]
        factor_t, _ = M.Paraphraser().apply({"params": st["paraphraser"]}, t.features[-2], decode=False)
        factor_s, upd = M.Translator(t.features[-2].shape[-1]).apply(
            {"params": variables["params"]["translator"], "batch_stats": st["batch_stats"]}, s.features[-2], train,
            mutable=["batch_stats"])
        return F.factor_transfer(factor_s, factor_t), {**st, "batch_stats": upd["batch_stats"]}


ALL = (Hint(), Attention(), Similarity(), Correlation(), VID(), CRD(), RKD(), PKT(), NST(), KDSVD(), FSP(), AB(),
       Factor(), AFD())
