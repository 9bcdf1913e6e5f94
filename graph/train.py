"""Training entry point of the graph domain: GDSS (Jo et al. 2022, seed 184) on the core engine.

    python -m graph.train data=community_small
    python -m graph.train data=grid trainer.steps=2000 trainer.batch_size=16
    python -m graph.train data=planar sampler.solver=s4 sampler.protocol=spectre

Config groups (``configs/graph/``): ``model`` (:class:`GraphModelConfig`: the two GDSS networks and
their SDEs), ``data`` (:class:`GraphDataConfig`), ``sampler`` (:class:`GraphSamplerConfig`: the GDSS
solver and the evaluation), ``trainer`` (``core.engine`` :class:`TrainerConfig`). Defaults are GDSS's
``config/community_small.yaml``; the data's batch is the whole training set (80 graphs), one step per
GDSS epoch.

The engine trains one module, :class:`GDSSModel`, holding ``ScoreNetworkX`` and ``ScoreNetworkA``; its
loss is the sum of GDSS's two losses (:func:`graph.gdss.gdss_loss`). At the end of a finished run the
model (``sampler.use_ema``: raw weights as GDSS's community-small sampler, or the EMA) generates graphs
with the GDSS solver, and ``<out_dir>/eval/`` gets ``metrics.json`` (MMDs against the test split),
``samples.pt`` (the dense samples) and, for generic graphs, ``samples.png`` / ``test.png`` (drawings) and
``samples.g6`` (graph6, one graph a line; :func:`graph.data.read_graphs` or ``networkx.read_graph6`` read it);
molecules get ``smiles.txt``, ``molecules.sdf`` and ``grid.png`` instead of the drawings.

Data sets (:data:`DATASETS`): the generic ones of :mod:`graph.data`; ``qm9``, ``moses`` and ``file``
are read through the molecule module's interface, imported only for them:

- ``graph.molecules.load_molecule_dataset(name, **data.options) -> dict`` with ``x`` ``(M, N, F)`` one-hot
  atom types, ``adj`` ``(M, N, N)`` bond orders (GDSS's QM9 encoding), ``flags`` ``(M, N)``, ``train_idx``,
  ``test_idx`` (index tensors or lists) and ``smiles`` (a list of M SMILES);
- ``graph.mol_metrics.evaluate_molecules(x, adj, flags, train_smiles, test_smiles, **kw) -> dict`` on the
  generated dense graphs (``kw`` holds ``out_dir``, where its signature takes it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from core.engine.checkpoint import atomic_write
from core.engine.config import ConfigError, register_schema
from core.engine.run import hydra_entry, prepare
from core.engine.trainer import Trainer, seed_from
from core.system import GaussianSystem

from .data import dense_to_networkx, load_graph_dataset, to_dense, write_graphs
from .gdss import SDE_TYPES, gdss_loss, gdss_sample, gdss_system
from .model import build_network
from .utils import quantize

log = logging.getLogger("polydiff.graph")

# "file": a user's SMILES file (data.options.path; see configs/graph/data/smiles.yaml). ZINC250k is not
# in any installed package, so it is not offered.
MOLECULE_DATASETS = ("qm9", "moses", "file")
X_NETWORKS = ("ScoreNetworkX", "ScoreNetworkX_GMH")
ADJ_NETWORKS = ("ScoreNetworkA",)

# ----------------------------------------------------------------------------- schemas


@dataclass
class SDEConfig:
    """A GDSS SDE: ``VP`` / ``subVP`` with beta from beta_min to beta_max, or ``VE`` (betas read as sigmas)."""

    type: str = "VP"
    beta_min: float = 0.1
    beta_max: float = 1.0
    num_scales: int = 1000  # GDSS's discretisation (tables of the PC / S4 steps); sampler.steps uses it

    def validate(self, name: str) -> None:
        if self.type not in SDE_TYPES:
            raise ValueError(f"{name}.type must be one of {list(SDE_TYPES)}, got {self.type!r}")
        if not 0 < self.beta_min < self.beta_max:
            raise ValueError(f"{name} needs 0 < beta_min < beta_max, got {self.beta_min!r}, {self.beta_max!r}")
        if self.num_scales < 1:
            raise ValueError(f"{name}.num_scales must be >= 1, got {self.num_scales!r}")


@dataclass
class GraphModelConfig:
    """GDSS's ``model`` and ``sde`` config sections (names as in its YAML files)."""

    x: str = "ScoreNetworkX"
    adj: str = "ScoreNetworkA"
    conv: str = "GCN"
    num_heads: int = 4
    depth: int = 3
    adim: int = 32
    nhid: int = 32
    num_layers: int = 5
    num_linears: int = 2
    c_init: int = 2
    c_hid: int = 8
    c_final: int = 4
    sde_x: SDEConfig = field(default_factory=SDEConfig)
    sde_adj: SDEConfig = field(default_factory=SDEConfig)
    eps: float = 1.0e-5  # smallest training time (GDSS train.eps)
    reduce_mean: bool = False  # GDSS train.reduce_mean: False sums the squared error over a graph (halved)

    def validate(self) -> None:
        if self.x not in X_NETWORKS:
            raise ValueError(f"model.x must be one of {list(X_NETWORKS)}, got {self.x!r}")
        if self.adj not in ADJ_NETWORKS:
            raise ValueError(f"model.adj must be one of {list(ADJ_NETWORKS)}, got {self.adj!r}")
        if self.conv not in ("GCN", "MLP"):
            raise ValueError(f"model.conv must be 'GCN' or 'MLP', got {self.conv!r}")
        for name in ("num_heads", "depth", "adim", "nhid", "num_layers", "num_linears", "c_init", "c_hid", "c_final"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_layers < 2:
            raise ValueError(f"model.num_layers must be >= 2 (GDSS's first and last attention layers), "
                             f"got {self.num_layers!r}")
        if not 0 <= self.eps < 1:
            raise ValueError(f"model.eps must lie in [0, 1), got {self.eps!r}")
        self.sde_x.validate("model.sde_x")
        self.sde_adj.validate("model.sde_adj")


@dataclass
class GraphDataConfig:
    name: str = "community_small"  # community_small | grid | planar | sbm | ego_small | graph_file | qm9 | moses | file
    # community_small seed 1: graphs of max degree 9, which fit GDSS's max_feat_num=10 one-hot degrees
    # (GDSS's released pickle has max degree 9; seeds 0, 4, 6, 7 draw a node of degree 10).
    seed: int = 1
    split_seed: int | None = 0  # None: keep the generated / file order (GDSS's split of its pickles)
    num_graphs: int | None = None  # None: the benchmark's count
    # generic graphs read from a file (graph6 / sparse6 / a pickled list of networkx graphs, graph.data.read_graphs)
    # instead of the generator; needed for ego_small and graph_file
    graph_file: str | None = None
    test_split: float = 0.2
    # None: the data's own (largest graph; max degree + 1 with init=deg, else 1; a molecule set's encoding).
    # A run records the values used, so its weights load again whatever the data config said.
    max_node_num: int | None = 20
    max_feat_num: int | None = 10
    init: str = "deg"  # node features of generic graphs: deg | ones | zeros
    options: dict[str, Any] = field(default_factory=dict)  # molecules: keyword arguments of the loader

    def validate(self) -> None:
        if self.name not in DATASETS and self.name not in MOLECULE_DATASETS:
            raise ValueError(f"data.name must be one of {sorted(DATASETS) + list(MOLECULE_DATASETS)}, "
                             f"got {self.name!r}")
        if self.init not in ("deg", "ones", "zeros"):
            raise ValueError(f"data.init must be 'deg', 'ones' or 'zeros', got {self.init!r}")
        if any(v is not None and (isinstance(v, bool) or v < 1) for v in (self.max_node_num, self.max_feat_num)):
            raise ValueError(f"data.max_node_num and data.max_feat_num must be >= 1, got {self.max_node_num}, "
                             f"{self.max_feat_num} (or null: the data's own)")
        if not 0 < self.test_split < 1:
            raise ValueError(f"data.test_split must lie in (0, 1), got {self.test_split!r}")
        if self.graph_file is not None:
            if self.name in MOLECULE_DATASETS:
                raise ValueError(f"data.graph_file is for generic graphs; molecule data sets ({self.name!r}) read "
                                 "their files through data.options")
            if not Path(str(self.graph_file)).is_file():
                raise ValueError(f"data.graph_file={self.graph_file!r} is not a file")
            if self.num_graphs is not None:
                raise ValueError(f"data.num_graphs={self.num_graphs} applies to generated data sets, not to "
                                 f"data.graph_file={self.graph_file!r}")
        elif self.name in ("ego_small", "graph_file"):
            load_graph_dataset(self.name)  # raises the explanation: these graphs come only from a file
        if self.options and self.name not in MOLECULE_DATASETS:
            raise ValueError(f"data.options is for molecule data sets only, got {dict(self.options)} for "
                             f"{self.name!r}")
        if self.name in MOLECULE_DATASETS:
            # these keys shape generic graphs only; a molecule set is split by data.options (seed, split_file,
            # test_fraction) and encoded from its atoms and bonds, so a changed value here would be ignored
            generic = GraphDataConfig()
            changed = [f"data.{k}={getattr(self, k)!r}" for k in ("seed", "split_seed", "num_graphs", "test_split", "init")
                       if getattr(self, k) != getattr(generic, k)]
            if changed:
                raise ValueError(f"{', '.join(changed)} applies to generic graphs, not to the molecule data set "
                                 f"{self.name!r}: set its split through data.options (seed, test_fraction, "
                                 "split_file; graph.molecules.load_molecule_dataset)")
            self.validate_options()

    def validate_options(self) -> None:
        """A molecule set's ``data.options``: keyword parameters of ``graph.molecules.load_molecule_dataset``
        (``name`` is data.name), the known ones of the right type and range, named files existing. Checked at
        start: the loader meets them only after every SMILES was encoded (minutes for QM9)."""
        import inspect

        try:
            from .molecules import load_molecule_dataset
        except ImportError as e:
            raise ValueError(f"data.name={self.name!r} reads molecules through graph.molecules, which does not "
                             f"import: {e}") from None
        opts = dict(self.options)
        params = inspect.signature(load_molecule_dataset).parameters
        if not any(q.kind == q.VAR_KEYWORD for q in params.values()):
            known = sorted(n for n, q in params.items()
                           if n != "name" and q.kind in (q.KEYWORD_ONLY, q.POSITIONAL_OR_KEYWORD))
            unknown = sorted(set(opts) - set(known))
            if unknown:
                raise ValueError(f"data.options {unknown} are not options of graph.molecules.load_molecule_dataset; "
                                 f"it takes {known} (the data set is data.name)")

        def bad(key: str, rule: str) -> None:
            raise ValueError(f"data.options.{key}={opts[key]!r} {rule}")

        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if "test_fraction" in opts and not (number(opts["test_fraction"]) and 0 < opts["test_fraction"] < 1):
            bad("test_fraction", "must be a number in (0, 1)")
        if "seed" in opts and not integer(opts["seed"]):
            bad("seed", "must be an integer")
        for key in ("limit", "max_atoms"):
            if opts.get(key) is not None and not (integer(opts[key]) and opts[key] >= 1):
                bad(key, "must be a positive integer or null")
        if "progress" in opts and not isinstance(opts["progress"], bool):
            bad("progress", "must be true or false")
        atoms = opts.get("atoms")
        if atoms is not None and (isinstance(atoms, str) or not isinstance(atoms, (list, tuple)) or not atoms
                                  or not all(isinstance(a, str) and a for a in atoms) or len(set(atoms)) != len(atoms)):
            bad("atoms", "must be a list of distinct element symbols, e.g. [C, N, O, F], or null")
        if self.name == "file" and not opts.get("path"):
            raise ValueError("data.name=file (data=smiles) needs data.options.path, the SMILES file to read")
        if opts.get("path") is not None:
            if self.name != "file":
                bad("path", f"is for data.name=file (data=smiles, a SMILES file); {self.name!r} reads its own files")
            if not Path(str(opts["path"])).is_file():
                bad("path", "is not a file (data=smiles reads a SMILES file)")
        if opts.get("split_file") is not None:
            if self.name != "qm9":
                bad("split_file", f"is for data.name=qm9 only, not {self.name!r}")
            if not Path(str(opts["split_file"])).is_file():
                bad("split_file", "is not a file (GDSS/MoFlow's valid_idx_qm9.json)")
        if opts.get("cache_dir") is not None and Path(str(opts["cache_dir"])).exists() \
                and not Path(str(opts["cache_dir"])).is_dir():
            bad("cache_dir", "exists and is not a directory")
        # sizes the options fix, against the data config's (they were compared only after the encoding)
        if opts.get("max_atoms") is not None and self.max_node_num not in (None, opts["max_atoms"]):
            bad("max_atoms", f"pads molecules to {opts['max_atoms']} atoms, but data.max_node_num="
                             f"{self.max_node_num}: set them equal (or data.max_node_num=null)")
        if atoms is not None and self.max_feat_num not in (None, len(atoms)):
            bad("atoms", f"has {len(atoms)} elements, but data.max_feat_num={self.max_feat_num}: set them equal "
                         "(or data.max_feat_num=null)")


PREDICTORS = {"Euler": "euler_maruyama", "Reverse": "reverse_diffusion", "euler_maruyama": "euler_maruyama",
              "reverse_diffusion": "reverse_diffusion", "none": "none"}


@dataclass
class GraphSamplerConfig:
    """GDSS's ``sampler`` / ``sample`` sections and the evaluation protocol."""

    solver: str = "pc"  # pc | s4
    predictor: str = "Euler"  # Euler (euler_maruyama) | Reverse (reverse_diffusion) | none
    corrector: str = "Langevin"  # Langevin | none
    snr: float = 0.05
    scale_eps: float = 0.7
    n_steps: int = 1  # corrector steps per step
    noise_removal: bool = True  # last step without its noise
    eps: float = 1.0e-4  # last sampling time
    use_ema: bool = False  # GDSS community-small samples with the raw weights
    seed: int = 11
    num_samples: int | None = None  # None: as many as test graphs (GDSS's protocol)
    batch_size: int = 1024  # graphs per solver call
    protocol: str = "gdss"  # MMD kernels: gdss | spectre (graph.metrics.PROTOCOLS)
    max_draw: int = 16  # graphs per PNG

    def validate(self) -> None:
        if self.solver not in ("pc", "s4"):
            raise ValueError(f"sampler.solver must be 'pc' or 's4', got {self.solver!r}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"sampler.predictor must be one of {sorted(PREDICTORS)}, got {self.predictor!r}")
        if self.corrector not in ("Langevin", "langevin", "none", "None"):
            raise ValueError(f"sampler.corrector must be 'Langevin' or 'none', got {self.corrector!r}")
        if not self.snr > 0 or not self.scale_eps >= 0:
            raise ValueError(f"sampler.snr must be > 0 and sampler.scale_eps >= 0, got {self.snr!r}, "
                             f"{self.scale_eps!r}")
        if self.n_steps < 0 or self.batch_size < 1 or self.max_draw < 0:
            raise ValueError(f"sampler.n_steps >= 0, batch_size >= 1, max_draw >= 0 needed, got {self.n_steps}, "
                             f"{self.batch_size}, {self.max_draw}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"sampler.num_samples must be None or >= 1, got {self.num_samples!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"sampler.eps must lie in (0, 1), got {self.eps!r}")
        from .metrics import PROTOCOLS

        if self.protocol not in PROTOCOLS:
            raise ValueError(f"sampler.protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")


register_schema("model", "graph_model_schema", GraphModelConfig)
register_schema("data", "graph_data_schema", GraphDataConfig)
register_schema("sampler", "graph_sampler_schema", GraphSamplerConfig)

# ----------------------------------------------------------------------------- data


@dataclass
class GraphData:
    """Dense graphs of a data set and its split; ``test_graphs`` (networkx) for generic graphs, SMILES for
    molecules."""

    name: str
    x: Tensor
    adj: Tensor
    flags: Tensor
    train_idx: Tensor
    test_idx: Tensor
    test_graphs: list | None = None
    train_smiles: list[str] | None = None
    test_smiles: list[str] | None = None
    atoms: list[str] | None = None  # molecules: the element of each node-feature column

    @property
    def is_molecule(self) -> bool:
        return self.name in MOLECULE_DATASETS

    def train(self) -> tuple[Tensor, Tensor, Tensor]:
        i = self.train_idx
        return self.x[i], self.adj[i], self.flags[i]


def _generic(cfg: GraphDataConfig) -> GraphData:
    ds = load_graph_dataset(cfg.name, seed=cfg.seed, split_seed=cfg.split_seed, num_graphs=cfg.num_graphs,
                            test_split=cfg.test_split, graph_file=cfg.graph_file)
    if cfg.max_node_num is not None and ds.max_node_num > cfg.max_node_num:
        raise ConfigError(f"data.max_node_num={cfg.max_node_num} is below the largest {cfg.name} graph "
                          f"({ds.max_node_num} nodes)")
    if cfg.max_feat_num is not None and cfg.init == "deg" and ds.max_degree >= cfg.max_feat_num:
        raise ConfigError(f"data.max_feat_num={cfg.max_feat_num} cannot one-hot the degrees of {cfg.name} (max "
                          f"degree {ds.max_degree}); set data.max_feat_num >= {ds.max_degree + 1}")
    graphs = ds.train + ds.test  # the validation graphs (SPECTRE) are not used by GDSS's training
    (x, adj, flags), _ = to_dense(graphs, cfg.max_node_num, cfg.max_feat_num, init=cfg.init)
    n_train = len(ds.train)
    return GraphData(cfg.name, x, adj, flags, torch.arange(n_train), torch.arange(n_train, len(graphs)),
                     test_graphs=ds.test)


def _molecules(cfg: GraphDataConfig) -> GraphData:
    from .molecules import load_molecule_dataset  # the molecule side (RDKit) is imported only when used

    if cfg.name == "file":  # a user's path: a clear config error rather than a traceback from deep in the reader
        path = dict(cfg.options).get("path")
        if not path or not Path(str(path)).is_file():
            raise ConfigError(f"data.options.path={path!r} is not a file (data=smiles reads a SMILES file)")
    out = load_molecule_dataset(cfg.name, **dict(cfg.options))
    missing = {"x", "adj", "flags", "train_idx", "test_idx", "smiles"} - set(out)
    if missing:
        raise ValueError(f"load_molecule_dataset({cfg.name!r}) returned no {sorted(missing)}")
    x, adj, flags = (torch.as_tensor(out[k]).float() for k in ("x", "adj", "flags"))
    if cfg.max_node_num not in (None, adj.shape[-1]) or cfg.max_feat_num not in (None, x.shape[-1]):
        raise ConfigError(f"data.max_node_num / max_feat_num = {cfg.max_node_num} / {cfg.max_feat_num}, but "
                          f"{cfg.name} has {adj.shape[-1]} nodes and {x.shape[-1]} features")
    tr, te = (torch.as_tensor(out[k], dtype=torch.long) for k in ("train_idx", "test_idx"))
    smiles = list(out["smiles"])
    return GraphData(cfg.name, x, adj, flags, tr, te, train_smiles=[smiles[i] for i in tr.tolist()],
                     test_smiles=[smiles[i] for i in te.tolist()],
                     atoms=list(out["atoms"]) if out.get("atoms") is not None else None)


# The registry of data sets: name -> loader(data config) -> GraphData. A molecule data set is
# registered by name in MOLECULE_DATASETS and read through graph.molecules (see the module docstring).
DATASETS: dict[str, Callable[[GraphDataConfig], GraphData]] = {
    "community_small": _generic,
    "grid": _generic,
    "planar": _generic,
    "sbm": _generic,
    "ego_small": _generic,  # from a file only (data.graph_file)
    "graph_file": _generic,  # a user's graphs (data.graph_file)
}


def load_data(cfg: GraphDataConfig) -> GraphData:
    """The dense data and split of ``cfg`` (a registered generic data set or a molecule data set)."""
    if cfg.name in MOLECULE_DATASETS:
        return _molecules(cfg)
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name {cfg.name!r} is not registered; choose one of "
                          f"{sorted(DATASETS) + list(MOLECULE_DATASETS)}")
    return DATASETS[cfg.name](cfg)


# ----------------------------------------------------------------------------- model and loss


class GDSSModel(nn.Module):
    """GDSS's two score networks in one module, for the engine: ``forward`` returns the two losses.

    ``model_x`` / ``model_adj`` keep the official parameter names (GDSS state dicts load into them).
    """

    def __init__(self, cfg: GraphModelConfig, max_node_num: int, max_feat_num: int):
        super().__init__()
        common = {"max_feat_num": max_feat_num, "nhid": cfg.nhid}
        attn = {"num_linears": cfg.num_linears, "c_init": cfg.c_init, "c_hid": cfg.c_hid, "c_final": cfg.c_final,
                "adim": cfg.adim, "num_heads": cfg.num_heads, "conv": cfg.conv}
        px = {**common, "depth": cfg.depth, **(attn if cfg.x == "ScoreNetworkX_GMH" else {})}
        self.model_x = build_network(cfg.x, **px)
        self.model_adj = build_network(cfg.adj, **common, max_node_num=max_node_num, num_layers=cfg.num_layers,
                                       **attn)
        self.system: GaussianSystem = gdss_system(
            (cfg.sde_x.type, cfg.sde_x.beta_min, cfg.sde_x.beta_max),
            (cfg.sde_adj.type, cfg.sde_adj.beta_min, cfg.sde_adj.beta_max),
        )
        self.max_node_num, self.max_feat_num = max_node_num, max_feat_num
        self.eps, self.reduce_mean = cfg.eps, cfg.reduce_mean

    def forward(self, x: Tensor, adj: Tensor, flags: Tensor, generator: torch.Generator | None = None):
        return gdss_loss(self.model_x, self.model_adj, self.system, x, adj, flags, generator=generator,
                         eps=self.eps, reduce_mean=self.reduce_mean)


def loss_fn(model: nn.Module, batch, generator: torch.Generator) -> dict[str, Tensor]:
    """GDSS's loss: ``loss_x + loss_adj`` (each network's own term, logged too)."""
    x, adj, flags = batch
    loss_x, loss_adj = model(x, adj, flags, generator=generator)
    return {"loss": loss_x + loss_adj, "loss_x": loss_x.detach(), "loss_adj": loss_adj.detach()}


# ----------------------------------------------------------------------------- sampling and evaluation


def sample_graphs(model: GDSSModel, sampler: GraphSamplerConfig, steps: int, train_flags: Tensor, num: int,
                  generator: torch.Generator, progress: bool = True) -> tuple[Tensor, Tensor, Tensor, int]:
    """Generate ``num`` graphs: node counts drawn from the training graphs (GDSS ``init_flags``), then the
    GDSS solver. Returns ``(x, adj, flags, nfe)`` with ``adj`` as generated (not quantised)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    xs, adjs, fls, nfe = [], [], [], 0
    corrector = "langevin" if sampler.corrector.lower() == "langevin" and sampler.n_steps > 0 else "none"
    options: dict[str, Any] = {"snr": sampler.snr, "scale_eps": sampler.scale_eps,
                               "last_step": "mean" if sampler.noise_removal else "none"}
    if sampler.solver == "pc":
        options.update(predictor=PREDICTORS[sampler.predictor], corrector=corrector,
                       n_corrector=max(sampler.n_steps, 1))
    bar = tqdm(total=steps * math.ceil(num / sampler.batch_size), desc="sample", disable=None if progress else True,
               leave=False)
    with bar:
        for start in range(0, num, sampler.batch_size):
            b = min(sampler.batch_size, num - start)
            idx = torch.randint(0, train_flags.shape[0], (b,), generator=generator, device=generator.device)
            flags = train_flags[idx.cpu()].to(device)
            x, adj, n = gdss_sample(model.model_x, model.model_adj, model.system, flags, model.max_feat_num,
                                    solver=sampler.solver, steps=steps, eps=sampler.eps, generator=generator,
                                    callback=lambda *_: bar.update(1), **options)
            xs.append(x.cpu())
            adjs.append(adj.cpu())
            fls.append(flags.cpu())
            nfe += n
    return torch.cat(xs), torch.cat(adjs), torch.cat(fls), nfe


def evaluate(model: GDSSModel, data: GraphData, sampler: GraphSamplerConfig, steps: int, out_dir: Path,
             generator: torch.Generator, tag: str = "eval", progress: bool = True) -> dict:
    """Sample, compute the metrics against the test split, write ``<out_dir>/<tag>/`` (metrics.json, PNGs,
    samples.pt, and samples.g6 for generic graphs) and return the metrics."""
    folder = out_dir / tag
    folder.mkdir(parents=True, exist_ok=True)
    num = sampler.num_samples or len(data.test_idx)
    t0 = time.perf_counter()
    model.eval()
    x, adj, flags, nfe = sample_graphs(model, sampler, steps, data.flags[data.train_idx], num, generator, progress)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {"data": data.name, "num_samples": num, "solver": sampler.solver, "steps": steps,
                               "nfe": nfe, "sample_seconds": round(seconds, 2)}
    atomic_write(folder / "samples.pt", lambda f: torch.save({"x": x, "adj": adj, "flags": flags}, f))
    if data.is_molecule:
        from .mol_metrics import evaluate_molecules

        kw = {} if data.atoms is None else {"atoms": data.atoms}  # e.g. a SMILES file's own vocabulary
        metrics.update(evaluate_molecules(x, adj, flags, data.train_smiles, data.test_smiles, out_dir=folder, **kw))
    else:
        from .draw import draw_graphs
        from .metrics import evaluate_graphs, structure_stats

        gen = dense_to_networkx(quantize(adj), flags)
        write_graphs(gen, folder / "samples.g6")
        t1 = time.perf_counter()
        metrics.update(evaluate_graphs(data.test_graphs, gen, protocol=sampler.protocol))
        metrics["eval_seconds"] = round(time.perf_counter() - t1, 2)
        metrics["protocol"] = sampler.protocol
        # plain averages beside the MMDs (components, triangles, clustering shares), the test graphs' alongside
        metrics["structure"] = structure_stats(gen)
        metrics["test_structure"] = structure_stats(data.test_graphs)
        if sampler.max_draw:
            draw_graphs(gen, folder / "samples.png", title=f"{data.name}: generated", max_num=sampler.max_draw)
            draw_graphs(data.test_graphs, folder / "test.png", title=f"{data.name}: test", max_num=sampler.max_draw)
    atomic_write(folder / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=1).encode()))
    return metrics


def make_sample_fn(data: GraphData, sampler: GraphSamplerConfig, steps: int):
    """During training (EMA weights): ``samples/step_<step>/`` with metrics and drawings."""

    def sample_fn(model: nn.Module, step: int, out_dir: Path) -> None:
        net = getattr(model, "module", model)
        device = next(net.parameters()).device
        g = torch.Generator(device=device).manual_seed(seed_from(sampler.seed, step))
        m = evaluate(net, data, sampler, steps, out_dir / "samples", g, tag=f"step_{step:08d}", progress=False)
        log.info("step %d samples: %s", step, {k: v for k, v in m.items() if isinstance(v, float)})

    return sample_fn


# ----------------------------------------------------------------------------- entry point


def train(cfg: DictConfig) -> dict:
    """Check ``cfg``, build data and model, train with the engine, then sample and evaluate; returns the
    engine's result with ``eval`` (the final metrics) when the run reached ``trainer.steps``."""
    ctx = prepare(cfg, groups=("model", "data", "sampler"))
    model_cfg: GraphModelConfig = ctx.groups["model"]
    data_cfg: GraphDataConfig = ctx.groups["data"]
    sampler: GraphSamplerConfig = ctx.groups["sampler"]
    if sampler.use_ema and not ctx.trainer.ema_decays:  # checked before training, not ignored after it
        raise ConfigError("sampler.use_ema=true but trainer.ema_decays is empty: the run keeps no EMA to sample "
                          "with; set trainer.ema_decays or sampler.use_ema=false")
    if ctx.trainer.strategy == "fsdp":  # checked before the data: the final evaluation needs whole weights
        raise ConfigError("trainer.strategy=fsdp is not supported by graph.train: its end-of-run evaluation samples "
                          "on rank 0 with the whole model, and GDSS's networks are small; use trainer.strategy=ddp")
    data = load_data(data_cfg)
    # the sizes used (a null max_node_num / max_feat_num is the data's own), as run.json records them
    data_cfg = dataclasses.replace(data_cfg, max_node_num=data.adj.shape[-1], max_feat_num=data.x.shape[-1])
    n_train = len(data.train_idx)
    if ctx.trainer.batch_size > n_train:
        raise ConfigError(f"trainer.batch_size={ctx.trainer.batch_size} exceeds the {n_train} training graphs of "
                          f"{data.name}; GDSS trains on full batches: set trainer.batch_size <= {n_train}")
    model = GDSSModel(model_cfg, data.adj.shape[-1], data.x.shape[-1])
    steps = model_cfg.sde_adj.num_scales
    out_dir = Path(ctx.trainer.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())  # before the engine wraps (FSDP shards) it
    # GDSS's last adjacency layer computes node values its output never uses (kept: the official weights hold
    # them), so DDP must allow parameters without a gradient
    trainer_cfg = dataclasses.replace(ctx.trainer, find_unused_parameters=True)
    trainer = Trainer(model, loss_fn, torch.utils.data.TensorDataset(*data.train()), trainer_cfg,
                      sample_fn=make_sample_fn(data, sampler, steps), run_config=ctx.snapshot())
    trainer.resume()  # a refused resume (another model's checkpoint) stops before run.json is rewritten
    if trainer.is_main:
        data_info = dataclasses.asdict(data_cfg)
        # Files recorded absolute, so graph.sample --run (and the benchmarks) find them from any directory.
        if data_cfg.graph_file is not None:
            data_info["graph_file"] = str(Path(data_cfg.graph_file).resolve())
        for key in ("path", "split_file", "cache_dir"):  # molecule loader options naming files or folders
            if data_info["options"].get(key) is not None:
                data_info["options"][key] = str(Path(str(data_info["options"][key])).resolve())
        info = {"model": dataclasses.asdict(model_cfg), "data": data_info,
                "sampler": dataclasses.asdict(sampler), "parameters": n_params,
                "train_graphs": n_train, "test_graphs": len(data.test_idx)}
        atomic_write(out_dir / "run.json", lambda f: f.write(json.dumps(info, indent=1).encode()))
    t0 = time.perf_counter()
    result = trainer.fit()
    result["train_seconds"] = round(time.perf_counter() - t0, 1)
    if trainer.step >= ctx.trainer.steps and trainer.is_main:
        net = trainer.raw_model
        g = torch.Generator(device=trainer.device).manual_seed(sampler.seed)
        if sampler.use_ema and trainer.ema is not None:
            with trainer.ema.swapped_in(net), torch.no_grad():
                result["eval"] = evaluate(net, data, sampler, steps, trainer.out_dir, g)
        else:
            with torch.no_grad():
                result["eval"] = evaluate(net, data, sampler, steps, trainer.out_dir, g)
    if trainer.is_main:
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()}), flush=True)
    return result


main = hydra_entry(train, Path(__file__).resolve().parents[1] / "configs" / "graph")

if __name__ == "__main__":
    main()
