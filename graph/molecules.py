"""Molecules as dense graphs for GDSS (Jo et al. 2022, seed 184): data sets, conversions and outputs.

A molecule of at most ``N`` heavy atoms is the pair GDSS trains on (``utils/data_loader_mol.py``):

- ``x`` ``(N, F)``: one-hot atom type over the data set's vocabulary (QM9: C, N, O, F); padded rows are 0;
- ``adj`` ``(N, N)``: symmetric bond orders of the *kekulised* molecule, 1 single, 2 double, 3 triple,
  0 no bond (GDSS does not rescale them; QM9's VE SDE runs on these raw values);
- ``flags`` ``(N,)``: 1 for real atoms.

Hydrogens are implicit and formal charges are not encoded (as in GDSS/MoFlow): decoding gives a
four-bonded N, O or S a +1 charge, GDSS's ``construct_mol`` rule. Data (all offline):

- ``qm9``: the 130,831 characterised QM9 molecules of the ``qm9pack`` package (its three CSV parts,
  column ``SMILES``, gdb index in ``Index``), at most 9 heavy atoms of C, N, O, F;
- ``moses``: the MOSES benchmark (filtered ZINC) shipped in ``molsets``
  (``moses/dataset/data/{train,test,test_scaffolds}.csv.gz``), atoms C, N, O, F, S, Cl, Br, at most 27;
- ``file``: a user's SMILES file (one SMILES per line, optional header; text after whitespace ignored).

Invalid SMILES and molecules the encoding cannot hold (an atom outside the vocabulary, too many atoms)
are reported (a warning with the count, and in the result's ``skipped``) and skipped, never silently.

Decoding follows GDSS/MoFlow (``utils/mol_utils.py``): :func:`dense_to_mol` (``construct_mol``),
:func:`correct_mol` (valency correction: lower the highest-order bond of an over-valent atom until
RDKit sanitises), :func:`largest_fragment` (``valid_mol_can_with_seg``). :func:`write_smiles`,
:func:`write_sdf` and :func:`draw_grid` write the outputs.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem, RDLogger
from torch import Tensor
from tqdm import tqdm

from core.engine.checkpoint import atomic_write_text

RDLogger.DisableLog("rdApp.*")  # RDKit prints every failed sanitisation; failures are counted instead

__all__ = [
    "QM9_ATOMS",
    "MOSES_ATOMS",
    "ZINC250K_ATOMS",
    "DATASETS",
    "canonical_smiles",
    "read_smiles_file",
    "qm9_smiles",
    "moses_smiles",
    "mol_to_dense",
    "smiles_to_dense",
    "dense_to_mol",
    "check_valency",
    "correct_mol",
    "largest_fragment",
    "quantize_molecules",
    "decode_molecules",
    "load_molecule_dataset",
    "mols_to_nx",
    "write_smiles",
    "write_sdf",
    "draw_grid",
]

QM9_ATOMS = ("C", "N", "O", "F")
MOSES_ATOMS = ("C", "N", "O", "F", "S", "Cl", "Br")
ZINC250K_ATOMS = ("C", "N", "O", "F", "P", "S", "Cl", "Br", "I")
DATASETS = ("qm9", "moses", "file")
MAX_ATOMS = {"qm9": 9, "moses": 27}

_BOND_ORDER = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3}
_BOND_TYPE = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
# GDSS's ATOM_VALENCY: the neutral valence of the atoms whose +1 cation construct_mol allows (N+, O+, S+).
_CATION_VALENCE = {7: 3, 8: 2, 16: 2}
_VALENCE_MSG = re.compile(r"#\s*(\d+)\s*\w*\s*,\s*(\d+)")


# ----------------------------------------------------------------------------------------- reading


def _package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it (molsets' ``__init__`` may fail)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {module!r} is not installed; it holds the offline molecule data")
    return Path(list(spec.submodule_search_locations)[0])


def canonical_smiles(smiles: str | Chem.Mol | None, isomeric: bool = False) -> str | None:
    """RDKit canonical SMILES of a SMILES string or Mol, ``None`` if it does not parse.

    Non-isomeric by default: the dense encoding holds no stereochemistry, so novelty and round trips
    compare molecules without it."""
    mol = Chem.MolFromSmiles(smiles) if isinstance(smiles, str) else smiles
    if mol is None:
        return None
    return Chem.MolToSmiles(mol, isomericSmiles=isomeric)


def read_smiles_file(path: str | Path, column: str | int = "smiles", *, with_lines: bool = False):
    """SMILES from a text/CSV file (``.gz`` accepted): one molecule a line, ``column`` a header name or index.

    Lines are split on commas, tabs or spaces; a first line that names ``column`` (or starts with the
    word ``smiles``) is a header. A name not in the header (or no header) reads the first field. Returns ``(smiles, invalid)``: the parsing
    SMILES, and ``(line_number, text, reason)`` for each line RDKit rejects; with ``with_lines``
    ``(smiles, invalid, line_numbers)``, the 1-based line of each returned SMILES. Invalid lines are also
    reported by a warning with their count.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"SMILES file {str(path)!r} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        lines = fh.read().splitlines()
    smiles, invalid, col, numbers = [], [], column, []
    for n, line in enumerate(lines, start=1):
        fields = [f for f in re.split(r"[,\t ]+", line.strip()) if f]
        if not fields:
            continue
        if n == 1 and isinstance(column, str) and (
            column in fields or (Chem.MolFromSmiles(fields[0]) is None and fields[0].lower() == "smiles")
        ):
            col = fields.index(column) if column in fields else 0
            continue
        if isinstance(col, str):
            col = 0
        if col >= len(fields):
            invalid.append((n, line, f"no column {col}"))
            continue
        text = fields[col]
        if Chem.MolFromSmiles(text) is None:
            invalid.append((n, text, "RDKit cannot parse it"))
        else:
            smiles.append(text)
            numbers.append(n)
    if invalid:
        warnings.warn(f"{path}: {len(invalid)} of {len(smiles) + len(invalid)} SMILES are invalid and skipped", stacklevel=2)
    return (smiles, invalid, numbers) if with_lines else (smiles, invalid)


def qm9_smiles(limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """The 130,831 QM9 SMILES of ``qm9pack`` in gdb order (the first ``limit``), and their gdb indices
    (1-based, column ``Index``). The three parts hold consecutive gdb ranges, so a limit reads only
    the rows it needs."""
    import pandas as pd

    folder = _package_dir("qm9pack") / "data"
    parts, have = [], 0
    for i in (1, 2, 3):
        nrows = None if limit is None else limit - have
        part = pd.read_csv(folder / f"qm9_part{i}.csv", usecols=["Index", "SMILES"], nrows=nrows)
        parts.append(part)
        have += len(part)
        if limit is not None and have >= limit:
            break
    df = pd.concat(parts, ignore_index=True).sort_values("Index", kind="stable")
    return df["SMILES"].tolist(), df["Index"].to_numpy(dtype=np.int64)


def moses_smiles(split: str) -> list[str]:
    """MOSES SMILES of ``split`` (``train`` 1,584,663, ``test`` 176,074 or ``test_scaffolds`` 176,225),
    read from ``molsets``' files by path (the ``moses`` package itself is not imported)."""
    if split not in ("train", "test", "test_scaffolds"):
        raise ValueError(f"unknown MOSES split {split!r}; choose 'train', 'test' or 'test_scaffolds'")
    path = _package_dir("moses") / "dataset" / "data" / f"{split}.csv.gz"
    with gzip.open(path, "rt") as fh:
        lines = fh.read().splitlines()
    if not lines or lines[0].strip().upper() != "SMILES":
        raise ValueError(f"{path} does not start with the header SMILES")
    return [s.strip() for s in lines[1:] if s.strip()]


# ------------------------------------------------------------------------------------ encode


def mol_to_dense(mol: Chem.Mol, atoms: Sequence[str], max_atoms: int) -> tuple[np.ndarray, np.ndarray]:
    """A molecule as GDSS's dense pair: ``x`` ``(max_atoms, len(atoms))`` one-hot and ``adj``
    ``(max_atoms, max_atoms)`` kekulised bond orders (float32). Raises ValueError when an atom is not
    in ``atoms``, the molecule has more than ``max_atoms`` heavy atoms, or it cannot be kekulised."""
    mol = Chem.Mol(mol)
    try:
        Chem.Kekulize(mol, clearAromaticFlags=True)
    except Exception as err:  # RDKit raises KekulizeException (a ValueError subclass) or RuntimeError
        raise ValueError(f"cannot kekulise {Chem.MolToSmiles(mol)!r}: {err}") from None
    n = mol.GetNumAtoms()
    if n > max_atoms:
        raise ValueError(f"{n} heavy atoms, more than max_atoms={max_atoms}")
    if n == 0:
        raise ValueError("the molecule has no heavy atom")
    index = {a: i for i, a in enumerate(atoms)}
    x = np.zeros((max_atoms, len(atoms)), dtype=np.float32)
    for atom in mol.GetAtoms():
        sym = atom.GetSymbol()
        if sym not in index:
            raise ValueError(f"atom {sym!r} is not in the vocabulary {tuple(atoms)}")
        x[atom.GetIdx(), index[sym]] = 1.0
    adj = np.zeros((max_atoms, max_atoms), dtype=np.float32)
    for bond in mol.GetBonds():
        order = _BOND_ORDER.get(bond.GetBondType())
        if order is None:
            raise ValueError(f"bond type {bond.GetBondType()} has no bond order after kekulisation")
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        adj[i, j] = adj[j, i] = order
    return x, adj


def smiles_to_dense(
    smiles: Sequence[str], atoms: Sequence[str], max_atoms: int, *, progress: bool = False, desc: str = "molecules"
) -> dict:
    """Encode SMILES with :func:`mol_to_dense`. Returns ``x`` ``(B, N, F)``, ``adj`` ``(B, N, N)``,
    ``flags`` ``(B, N)`` (float32 tensors), ``smiles`` (canonical, non-isomeric, of the encoded molecules),
    ``kept`` (their input positions) and ``skipped``: ``(position, smiles, reason)`` for each one left out."""
    xs, adjs, canon, kept, skipped = [], [], [], [], []
    for i, s in enumerate(tqdm(smiles, desc=desc, disable=not progress, mininterval=2.0)):
        mol = Chem.MolFromSmiles(s)
        if mol is None:
            skipped.append((i, s, "invalid SMILES"))
            continue
        try:
            x, adj = mol_to_dense(mol, atoms, max_atoms)
        except ValueError as err:
            skipped.append((i, s, str(err)))
            continue
        xs.append(x)
        adjs.append(adj)
        canon.append(Chem.MolToSmiles(mol, isomericSmiles=False))
        kept.append(i)
    f = len(atoms)
    x = torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, max_atoms, f)
    adj = torch.from_numpy(np.stack(adjs)) if adjs else torch.zeros(0, max_atoms, max_atoms)
    return {
        "x": x,
        "adj": adj,
        "flags": x.sum(-1).gt(0).to(torch.float32),
        "smiles": canon,
        "kept": kept,
        "skipped": skipped,
    }


# ------------------------------------------------------------------------------------ decode


def check_valency(mol: Chem.Mol) -> tuple[bool, tuple[int, int] | None]:
    """GDSS's ``check_valency``: ``(True, None)`` if RDKit's property sanitisation passes, else
    ``(False, (atom_index, valence))`` of the first over-valent atom RDKit reports."""
    try:
        Chem.SanitizeMol(mol, sanitizeOps=Chem.SanitizeFlags.SANITIZE_PROPERTIES)
        return True, None
    except Chem.AtomValenceException as err:
        m = _VALENCE_MSG.search(str(err))
        if m:
            return False, (int(m.group(1)), int(m.group(2)))
        # message format changed: find the first atom whose bond-order sum exceeds its allowed valence
        table = Chem.GetPeriodicTable()
        for atom in mol.GetAtoms():
            v = int(round(sum(b.GetBondTypeAsDouble() for b in atom.GetBonds())))
            allowed = max(table.GetValenceList(atom.GetAtomicNum())) + atom.GetFormalCharge()
            if v > allowed:
                return False, (atom.GetIdx(), v)
        raise


def dense_to_mol(x, adj, atoms: Sequence[str], flags=None) -> Chem.RWMol:
    """One molecule from its dense pair (GDSS ``construct_mol``).

    ``x`` ``(N, F)``: an atom where some entry exceeds 0.5, of the first such type (GDSS thresholds at
    0.5 and takes the argmax against a "no atom" channel); rows with ``flags == 0`` are no atom.
    ``adj`` ``(N, N)``: integer bond orders 0-3 (:func:`quantize_molecules`), read from the lower
    triangle in row order as GDSS does. After each bond, an N, O or S whose valence is one above its
    neutral valence gets a +1 formal charge. The result is not sanitised: see :func:`correct_mol`.
    """
    x = torch.as_tensor(x).detach().cpu()
    adj = torch.as_tensor(adj).detach().cpu()
    if x.ndim != 2 or x.shape[1] != len(atoms):
        raise ValueError(f"x must be (N, {len(atoms)}) for atoms {tuple(atoms)}, got shape {tuple(x.shape)}")
    if adj.shape != (x.shape[0], x.shape[0]):
        raise ValueError(f"adj must be ({x.shape[0]}, {x.shape[0]}), got shape {tuple(adj.shape)}")
    on = x > 0.5
    exists = on.any(-1)
    if flags is not None:
        exists &= torch.as_tensor(flags).detach().cpu() > 0.5
    types = on.to(torch.uint8).argmax(-1)  # first type above the threshold
    keep = exists.nonzero().flatten().tolist()
    mol = Chem.RWMol()
    for i in keep:
        mol.AddAtom(Chem.Atom(atoms[int(types[i])]))
    bonds = adj[keep][:, keep].round().to(torch.int64).clamp(0, 3).numpy()
    for i, j in zip(*np.nonzero(bonds)):
        if i <= j:  # GDSS walks the nonzero pairs in row order and keeps start > end
            continue
        mol.AddBond(int(i), int(j), _BOND_TYPE[int(bonds[i, j])])
        ok, bad = check_valency(mol)
        if not ok:
            idx, v = bad
            atom = mol.GetAtomWithIdx(idx)
            an = atom.GetAtomicNum()
            if an in _CATION_VALENCE and v - _CATION_VALENCE[an] == 1:
                atom.SetFormalCharge(1)
    return mol


def correct_mol(mol: Chem.Mol) -> tuple[Chem.RWMol, bool]:
    """GDSS/MoFlow valency correction. Returns ``(corrected, valid_without_correction)``.

    While RDKit reports an over-valent atom, its highest-order bond (the first listed among ties) is
    lowered by one order (a single bond is removed). An empty molecule counts as invalid.
    """
    mol = Chem.RWMol(mol)
    ok, bad = check_valency(mol)
    valid = ok and mol.GetNumAtoms() > 0
    while not ok:
        idx, _ = bad
        bonds = [
            (b.GetBeginAtomIdx(), b.GetEndAtomIdx(), int(b.GetBondTypeAsDouble()))
            for b in mol.GetAtomWithIdx(idx).GetBonds()
        ]
        if not bonds:  # over-valent with no bond (a charge problem): nothing GDSS's rule can lower
            break
        i, j, order = max(bonds, key=lambda b: b[2])  # max keeps the first of ties, like a stable sort
        mol.RemoveBond(i, j)
        if order > 1:
            mol.AddBond(i, j, _BOND_TYPE[order - 1])
        ok, bad = check_valency(mol)
    return mol, valid


def largest_fragment(mol: Chem.Mol | None, largest_connected_comp: bool = True) -> Chem.Mol | None:
    """GDSS ``valid_mol_can_with_seg``: round trip through SMILES, keeping the fragment with the longest
    SMILES when the molecule is disconnected. ``None`` if RDKit cannot parse the result."""
    if mol is None:
        return None
    try:
        smi = Chem.MolToSmiles(mol, isomericSmiles=True)
    except Exception:  # an unsanitisable molecule cannot be written
        return None
    if largest_connected_comp and "." in smi:
        smi = max(smi.split("."), key=len)  # max keeps the first of equal lengths, as GDSS's stable sort
    return Chem.MolFromSmiles(smi)


def quantize_molecules(x: Tensor, adj: Tensor, flags: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GDSS's read-out of sampled molecules: ``x > 0.5`` (0/1 per type) and bond orders by
    ``graph.utils.quantize_mol`` (``[0.5, 1.5) -> 1``, ``[1.5, 2.5) -> 2``, ``>= 2.5 -> 3``), masked."""
    from .utils import quantize_mol

    xq = (x > 0.5).to(torch.float32)
    aq = quantize_mol(adj)
    if flags is not None:
        on = torch.as_tensor(flags) > 0.5
        xq = xq * on[..., None]
        aq = aq * (on[..., :, None] & on[..., None, :])
    return xq, aq


def decode_molecules(x: Tensor, adj: Tensor, flags: Tensor | None, atoms: Sequence[str], quantize: bool = True) -> dict:
    """Sampled dense molecules ``(B, N, F), (B, N, N), (B, N)`` to RDKit molecules (GDSS ``gen_mol``).

    Returns ``raw`` (:func:`dense_to_mol`), ``valid_wo_correction`` (bool per sample),
    ``mols`` (corrected and reduced to the largest fragment, ``None`` where that fails) and
    ``smiles`` (canonical isomeric SMILES of ``mols``, ``None`` for failures and empty molecules).
    """
    if quantize:
        x, adj = quantize_molecules(x, adj, flags)
    raw, valid, mols, smiles = [], [], [], []
    for i in range(x.shape[0]):
        mol = dense_to_mol(x[i], adj[i], atoms, None if flags is None else flags[i])
        fixed, ok = correct_mol(mol)
        frag = largest_fragment(fixed)
        smi = Chem.MolToSmiles(frag) if frag is not None else None
        raw.append(mol)
        valid.append(ok)
        mols.append(frag if smi else None)
        smiles.append(smi or None)
    return {"raw": raw, "valid_wo_correction": valid, "mols": mols, "smiles": smiles}


# ------------------------------------------------------------------------------------ data sets


def _seeded_split(n: int, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[test_size:]), np.sort(perm[:test_size])


def _official_qm9_split(split_file: Path, gdb_index: np.ndarray) -> np.ndarray:
    """Rows of our QM9 whose gdb index is in GDSS/MoFlow's ``valid_idx_qm9.json``.

    That file lists 0-based rows of the 133,885-row ``qm9.csv`` (gdb order), i.e. gdb index - 1;
    the 3,054 uncharacterised molecules qm9pack leaves out drop out of the test set with them."""
    with open(split_file) as fh:
        data = json.load(fh)
    rows = data["valid_idxs"] if isinstance(data, dict) else data
    wanted = np.asarray([int(r) for r in rows], dtype=np.int64) + 1
    return np.flatnonzero(np.isin(gdb_index, wanted))


def _cache_key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def load_molecule_dataset(
    name: str,
    *,
    path: str | Path | None = None,
    atoms: Sequence[str] | None = None,
    max_atoms: int | None = None,
    split_file: str | Path | None = None,
    test_fraction: float = 0.1,
    seed: int = 42,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """A molecule data set as dense GDSS tensors with a train/test split.

    Args:
        name: ``"qm9"``, ``"moses"`` or ``"file"`` (``path`` to a SMILES file, see :func:`read_smiles_file`).
        atoms, max_atoms: the vocabulary and padding; defaults QM9 (C, N, O, F; 9), MOSES (C, N, O, F, S,
            Cl, Br; 27); for a file, the elements and the largest size found in it.
        split_file: QM9 only: GDSS/MoFlow's ``valid_idx_qm9.json`` for the standard test split. Without
            it (the file is not shipped with any installed package) the test set is a seeded random
            ``test_fraction`` of the molecules (``seed``), documented as such in ``split``.
            MOSES uses its own train/test files; a SMILES file uses the seeded split.
        limit: keep only the first ``limit`` molecules (per split for MOSES), for quick runs.
        cache_dir: store the encoded tensors there (``.pt``) and reuse them next time.

    Returns a dict: ``x`` ``(B, N, F)``, ``adj`` ``(B, N, N)`` (bond orders), ``flags`` ``(B, N)`` (float32),
    ``train_idx``, ``test_idx`` (int64 tensors), ``smiles`` (canonical, non-isomeric), ``atoms``,
    ``max_atoms``, ``split`` (how the split was made), ``skipped`` (``(source_row, smiles, reason)``, sorted; for a SMILES file the row is
    its 1-based line number, for QM9 / MOSES the position in the source list).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown molecule data set {name!r}; choose one of {DATASETS}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if name != "qm9" and split_file is not None:
        raise ValueError(f"split_file is for qm9 only, got split_file={str(split_file)!r} for {name!r}")
    if name == "file" and path is None:
        raise ValueError("name='file' needs path= to a SMILES file")

    cache = None
    if cache_dir is not None:
        stamp = None
        if path is not None:
            st = Path(path).stat()
            stamp = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        sf = None if split_file is None else str(Path(split_file).resolve())
        key = _cache_key(name, stamp, atoms, max_atoms, sf, test_fraction, seed, limit, 2)  # 2: file rows are lines
        cache = Path(cache_dir) / f"{name}_{key}.pt"
        if cache.is_file():
            out = torch.load(cache, weights_only=True)
            out["atoms"] = tuple(out["atoms"])
            out["skipped"] = [tuple(s) for s in out["skipped"]]
            return out

    invalid_file: list = []
    if name == "qm9":
        atoms = tuple(atoms or QM9_ATOMS)
        max_atoms = max_atoms or MAX_ATOMS["qm9"]
        smiles, gdb = qm9_smiles(limit)
        enc = smiles_to_dense(smiles, atoms, max_atoms, progress=progress, desc="QM9")
        kept = np.asarray(enc["kept"], dtype=np.int64)
        if split_file is not None:
            test = _official_qm9_split(Path(split_file), gdb[kept])
            train = np.setdiff1d(np.arange(len(kept)), test)
            split = f"official GDSS/MoFlow split from {Path(split_file).name} (gdb index - 1 = row)"
        else:
            train, test = _seeded_split(len(kept), round(test_fraction * len(kept)), seed)
            split = f"seeded random: {test_fraction:g} of the molecules as test, numpy default_rng({seed})"
    elif name == "moses":
        atoms = tuple(atoms or MOSES_ATOMS)
        max_atoms = max_atoms or MAX_ATOMS["moses"]
        tr, te = moses_smiles("train"), moses_smiles("test")
        if limit is not None:
            tr, te = tr[:limit], te[:limit]
        enc = smiles_to_dense(tr + te, atoms, max_atoms, progress=progress, desc="MOSES")
        kept = np.asarray(enc["kept"], dtype=np.int64)
        train, test = np.flatnonzero(kept < len(tr)), np.flatnonzero(kept >= len(tr))
        split = "MOSES train.csv.gz / test.csv.gz"
    else:
        smiles, invalid_file, line_of = read_smiles_file(path, with_lines=True)
        if limit is not None:
            smiles = smiles[:limit]
        if atoms is None or max_atoms is None:
            mols = [Chem.MolFromSmiles(s) for s in smiles]
            if atoms is None:
                found = {a.GetSymbol() for m in mols for a in m.GetAtoms()}
                atoms = tuple(sorted(found, key=lambda s: (Chem.GetPeriodicTable().GetAtomicNumber(s), s)))
            if max_atoms is None:
                max_atoms = max((m.GetNumAtoms() for m in mols), default=1)
        atoms = tuple(atoms)
        enc = smiles_to_dense(smiles, atoms, max_atoms, progress=progress, desc=Path(path).name)
        n = len(enc["kept"])
        if n < 2:
            raise ValueError(f"{path}: only {n} usable molecules, a train/test split needs at least 2")
        train, test = _seeded_split(n, max(1, round(test_fraction * n)), seed)
        split = f"seeded random: {test_fraction:g} of the molecules as test, numpy default_rng({seed})"

    # a SMILES file's rows are its line numbers, for parse failures (read_smiles_file) and encoding
    # failures (positions in the parsed list, mapped back to their lines) alike
    row = (lambda i: line_of[i]) if name == "file" else (lambda i: i)
    skipped = sorted([(int(row(i)), s, r) for i, s, r in enc["skipped"]] + [(int(i), s, r) for i, s, r in invalid_file])
    if enc["skipped"]:
        reasons = sorted({r.split(":")[0] if "atom" not in r else r for _, _, r in enc["skipped"]})[:5]
        warnings.warn(
            f"{name}: {len(enc['skipped'])} molecules skipped (cannot be encoded), e.g. {reasons}", stacklevel=2
        )
    out = {
        "x": enc["x"],
        "adj": enc["adj"],
        "flags": enc["flags"],
        "train_idx": torch.from_numpy(np.asarray(train, dtype=np.int64)),
        "test_idx": torch.from_numpy(np.asarray(test, dtype=np.int64)),
        "smiles": enc["smiles"],
        "atoms": atoms,
        "max_atoms": int(max_atoms),
        "split": split,
        "skipped": skipped,
    }
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({**out, "atoms": list(atoms), "skipped": [list(s) for s in skipped]}, tmp)
        tmp.replace(cache)
    return out


# ------------------------------------------------------------------------------------ outputs


def mols_to_nx(mols: Iterable[Chem.Mol]) -> list:
    """Molecules as networkx graphs with node ``label`` = element symbol and edge ``label`` = int bond
    order (aromatic bonds 1.5 -> 1), as GDSS's ``mols_to_nx`` builds them for NSPDK."""
    import networkx as nx

    graphs = []
    for mol in mols:
        g = nx.Graph()
        for atom in mol.GetAtoms():
            g.add_node(atom.GetIdx(), label=atom.GetSymbol())
        for bond in mol.GetBonds():
            g.add_edge(bond.GetBeginAtomIdx(), bond.GetEndAtomIdx(), label=int(bond.GetBondTypeAsDouble()))
        graphs.append(g)
    return graphs


def write_smiles(path: str | Path, smiles: Iterable[str | None]) -> Path:
    """One ``SMILES sample_<i>`` a line, ``i`` the sample's index (as the names in :func:`write_sdf`'s
    SDF); failed samples (``None``) are left out, so the names keep lines and samples paired."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(f"{s} sample_{i}\n" for i, s in enumerate(smiles) if s))
    return path


def write_sdf(path: str | Path, mols: Iterable[Chem.Mol | None]) -> Path:
    """An SDF of the molecules (2D coordinates computed by RDKit; ``None`` entries are left out)."""
    from rdkit.Chem import AllChem

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Chem.SDWriter(str(path)) as writer:
        for i, mol in enumerate(mols):
            if mol is None:
                continue
            mol = Chem.Mol(mol)
            AllChem.Compute2DCoords(mol)
            mol.SetProp("_Name", f"sample_{i}")
            writer.write(mol)
    return path


def draw_grid(path: str | Path, mols: Sequence[Chem.Mol | None], n: int = 32, per_row: int = 8, size: int = 200) -> Path:
    """A PNG grid of the first ``n`` molecules with their SMILES as legends (RDKit ``MolsToGridImage``;
    falls back to matplotlib with RDKit's per-molecule raster drawings if the grid drawer fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mols = [m for m in mols if m is not None][:n]
    if not mols:
        raise ValueError("draw_grid needs at least one molecule")
    legends = [Chem.MolToSmiles(m) for m in mols]
    try:
        from rdkit.Chem import Draw

        img = Draw.MolsToGridImage(mols, molsPerRow=per_row, subImgSize=(size, size), legends=legends)
        img.save(str(path))
    except Exception:  # no Cairo/Agg drawer: one image per molecule through matplotlib
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from rdkit.Chem import Draw

        rows = (len(mols) + per_row - 1) // per_row
        fig, axes = plt.subplots(rows, per_row, figsize=(2 * per_row, 2 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, mol, legend in zip(axes.flat, mols, legends):
            ax.imshow(Draw.MolToImage(mol, size=(size, size)))
            ax.set_title(legend, fontsize=6)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
    return path
