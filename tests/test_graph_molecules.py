"""Molecules for GDSS: data, dense round trips, GDSS's decoding and valency correction, metrics.

Checks against independent references: RDKit's own canonical SMILES (round trips), hand-made
over-valent graphs with a known corrected form, hand-counted uniqueness/novelty, NSPDK invariants
(isomorphism, self-MMD 0, the MMD identity against an explicit kernel matrix), FCD of a set with itself,
and (slow, needs the official checkpoint) the validity of the official pretrained QM9 GDSS model.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem

from graph.mol_metrics import (
    evaluate_molecules,
    fcd,
    nspdk_features,
    nspdk_mean_embedding,
    nspdk_mmd,
    validity_uniqueness_novelty,
)
from graph.molecules import (
    MOSES_ATOMS,
    QM9_ATOMS,
    check_valency,
    correct_mol,
    decode_molecules,
    dense_to_mol,
    draw_grid,
    largest_fragment,
    load_molecule_dataset,
    mols_to_nx,
    moses_smiles,
    qm9_smiles,
    read_smiles_file,
    smiles_to_dense,
    write_sdf,
    write_smiles,
)


@pytest.fixture(scope="module")
def qm9():
    return load_molecule_dataset("qm9", limit=600, progress=False)


def canon(smiles):
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles), isomericSmiles=False)


# ------------------------------------------------------------------------------------------ data


def test_qm9_rows(qm9):
    assert qm9["x"].shape == (600, 9, 4) and qm9["adj"].shape == (600, 9, 9) and qm9["flags"].shape == (600, 9)
    assert qm9["atoms"] == QM9_ATOMS and qm9["skipped"] == []
    # one-hot rows exactly where flags are set; bond orders 0-3, symmetric, zero diagonal
    assert torch.equal(qm9["x"].sum(-1), qm9["flags"])
    assert set(qm9["adj"].unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert torch.equal(qm9["adj"], qm9["adj"].transpose(1, 2))
    assert qm9["adj"].diagonal(dim1=1, dim2=2).abs().sum() == 0
    # the heavy-atom counts and element counts agree with RDKit on the stored SMILES
    for i in range(0, 600, 37):
        mol = Chem.MolFromSmiles(qm9["smiles"][i])
        assert int(qm9["flags"][i].sum()) == mol.GetNumAtoms()
        for k, sym in enumerate(QM9_ATOMS):
            assert int(qm9["x"][i, :, k].sum()) == sum(a.GetSymbol() == sym for a in mol.GetAtoms())
    # gdb order: the first molecules are methane, ammonia, water
    assert qm9["smiles"][:3] == ["C", "N", "O"]
    tr, te = qm9["train_idx"], qm9["test_idx"]
    assert len(te) == 60 and len(tr) == 540
    assert sorted(torch.cat([tr, te]).tolist()) == list(range(600))


def test_qm9_split_file_uses_gdb_rows(tmp_path):
    # valid_idx_qm9.json lists 0-based rows of the 133,885-row qm9.csv, i.e. gdb index - 1
    f = tmp_path / "valid_idx_qm9.json"
    f.write_text('{"valid_idxs": ["000004", "000010", "000099"]}')
    d = load_molecule_dataset("qm9", limit=200, split_file=f, progress=False)
    _, gdb = qm9_smiles(200)  # qm9pack leaves out the uncharacterised molecules, so rows != gdb - 1
    assert gdb[0] == 1 and len(gdb) == 200 and gdb[-1] > 200
    assert d["test_idx"].tolist() == [i for i, g in enumerate(gdb) if g - 1 in (4, 10, 99)]
    assert len(d["test_idx"]) == 3 and len(d["train_idx"]) == 197 and "official" in d["split"]


def test_moses_vocabulary_and_size():
    test = moses_smiles("test")
    assert len(test) == 176074
    enc = smiles_to_dense(test[:300], MOSES_ATOMS, 27)
    assert enc["skipped"] == [] and enc["x"].shape == (300, 27, 7)
    with pytest.raises(ValueError, match="split"):
        moses_smiles("valid")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="zinc"):
        load_molecule_dataset("zinc")
    with pytest.raises(ValueError, match="limit"):
        load_molecule_dataset("qm9", limit=0)
    with pytest.raises(ValueError, match="path"):
        load_molecule_dataset("file")
    with pytest.raises(ValueError, match="does not exist"):
        read_smiles_file(tmp_path / "missing.smi")
    with pytest.raises(ValueError, match="x must be"):
        dense_to_mol(torch.zeros(9, 5), torch.zeros(9, 9), QM9_ATOMS)


def test_user_smiles_file_reports_invalid(tmp_path):
    f = tmp_path / "mine.csv"
    f.write_text("smiles,name\nCCO,ethanol\nC1CC,broken\nc1ccccc1,benzene\nC(C)(C)(C)(C)C,pentavalent\nCC#N,x\nClCCBr,y\n")
    with pytest.warns(UserWarning, match="2 of 6 SMILES are invalid"):
        smiles, invalid = read_smiles_file(f, column="smiles")
    assert smiles == ["CCO", "c1ccccc1", "CC#N", "ClCCBr"]
    assert [(n, s) for n, s, _ in invalid] == [(3, "C1CC"), (5, "C(C)(C)(C)(C)C")]
    with pytest.warns(UserWarning, match="2 of 6"):
        d = load_molecule_dataset("file", path=f, progress=False, test_fraction=0.25)
    assert d["x"].shape[0] == 4 and len(d["skipped"]) == 2
    assert d["atoms"] == ("C", "N", "O", "Cl", "Br") and d["max_atoms"] == 6
    # a vocabulary without Br skips (and reports) the molecule that has one
    with pytest.warns(UserWarning):
        d2 = load_molecule_dataset("file", path=f, atoms=("C", "N", "O", "Cl"), progress=False)
    assert d2["x"].shape[0] == 3 and any("'Br'" in r for _, _, r in d2["skipped"])
    # every skipped entry names its line of the file, whether RDKit or the encoder refused it
    assert [(n, s) for n, s, _ in d2["skipped"]] == [(3, "C1CC"), (5, "C(C)(C)(C)(C)C"), (7, "ClCCBr")]


def test_cache_round_trip(tmp_path):
    a = load_molecule_dataset("qm9", limit=50, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("qm9_*.pt"))) == 1
    b = load_molecule_dataset("qm9", limit=50, cache_dir=tmp_path, progress=False)
    for k in ("x", "adj", "flags", "train_idx", "test_idx"):
        assert torch.equal(a[k], b[k])
    assert a["smiles"] == b["smiles"] and a["atoms"] == b["atoms"]


# ------------------------------------------------------------------------------------ round trips


def test_dense_round_trip_qm9(qm9):
    """SMILES -> tensors -> Mol -> canonical SMILES for the uncharged molecules (charges are not encoded)."""
    dec = decode_molecules(qm9["x"], qm9["adj"], qm9["flags"], QM9_ATOMS, quantize=True)
    checked = 0
    for s, out, ok in zip(qm9["smiles"], dec["smiles"], dec["valid_wo_correction"]):
        if "+" in s or "-]" in s:
            continue
        assert ok, s
        assert canon(out) == s
        checked += 1
    assert checked >= 590


def test_dense_round_trip_moses():
    smiles = moses_smiles("test")[:200]
    enc = smiles_to_dense(smiles, MOSES_ATOMS, 27)
    dec = decode_molecules(enc["x"], enc["adj"], enc["flags"], MOSES_ATOMS, quantize=False)
    assert all(dec["valid_wo_correction"])
    assert [canon(s) for s in dec["smiles"]] == [canon(s) for s in smiles]


def test_quantised_noise_reads_as_gdss_does():
    # continuous samples near the one-hot / bond-order values decode to the same molecule
    enc = smiles_to_dense(["OC1=CC=CC=C1", "C#CC(=O)N"], QM9_ATOMS, 9)
    g = torch.Generator().manual_seed(0)
    x = enc["x"] + 0.2 * torch.rand(enc["x"].shape, generator=g) - 0.1
    adj = enc["adj"] + 0.4 * torch.rand(enc["adj"].shape, generator=g) - 0.2
    adj = (adj + adj.transpose(1, 2)) / 2
    dec = decode_molecules(x, adj, enc["flags"], QM9_ATOMS)
    assert dec["smiles"] == [canon("Oc1ccccc1"), canon("C#CC(N)=O")]


# ------------------------------------------------------------------------------- valency correction


def _dense(n_atoms, symbols, bonds):
    x = torch.zeros(9, 4)
    for i, s in enumerate(symbols):
        x[i, QM9_ATOMS.index(s)] = 1
    adj = torch.zeros(9, 9)
    for i, j, o in bonds:
        adj[i, j] = adj[j, i] = o
    return x, adj


def test_correction_fixes_overvalent_carbon():
    # C0 with four single bonds and a double bond: valence 6. GDSS lowers its highest bond (the double)
    # to single, then removes one single bond: a neopentane-like C with four C neighbours remains.
    x, adj = _dense(6, "CCCCCC", [(0, 1, 1), (0, 2, 1), (0, 3, 1), (0, 4, 1), (0, 5, 2)])
    mol = dense_to_mol(x, adj, QM9_ATOMS)
    assert check_valency(mol)[0] is False and check_valency(mol)[1][0] == 0
    fixed, valid = correct_mol(mol)
    assert valid is False
    assert check_valency(fixed) == (True, None)
    assert fixed.GetAtomWithIdx(0).GetDegree() == 4
    assert all(b.GetBondTypeAsDouble() == 1 for b in fixed.GetBonds())
    frag = largest_fragment(fixed)
    assert Chem.MolToSmiles(frag) == "CC(C)(C)C"  # the detached methyl is dropped


def test_correction_lowers_triple_and_charges_nitrogen():
    # O=C=O is fine; C#O-C over-valent at O (valence 4 -> O+ allowed only at 3): lower the triple
    x, adj = _dense(3, "COC", [(0, 1, 3), (1, 2, 1)])
    fixed, valid = correct_mol(dense_to_mol(x, adj, QM9_ATOMS))
    assert valid is False and Chem.MolToSmiles(largest_fragment(fixed)) == "C=[O+]C"
    # a four-bonded N gets GDSS's +1 charge and is valid without correction
    x, adj = _dense(5, "NCCCC", [(0, 1, 1), (0, 2, 1), (0, 3, 1), (0, 4, 1)])
    mol, valid = correct_mol(dense_to_mol(x, adj, QM9_ATOMS))
    assert valid is True and Chem.MolToSmiles(mol) == "C[N+](C)(C)C"


def test_empty_sample_is_invalid():
    dec = decode_molecules(torch.zeros(1, 9, 4), torch.zeros(1, 9, 9), torch.zeros(1, 9), QM9_ATOMS)
    assert dec["valid_wo_correction"] == [False] and dec["smiles"] == [None]


# ------------------------------------------------------------------------------------------ metrics


def test_validity_uniqueness_novelty_counts():
    gen = ["CCO", "OCC", "c1ccccc1", "CC#N", None, "CCN"]  # OCC is CCO again
    train = ["C(C)O", "CCN"]
    m = validity_uniqueness_novelty(gen, [True, True, True, False, False, True], train)
    assert m["validity"] == pytest.approx(5 / 6)
    assert m["validity_wo_correction"] == pytest.approx(4 / 6)
    assert m["uniqueness"] == pytest.approx(4 / 5)  # CCO, benzene, CC#N, CCN
    assert m["novelty"] == pytest.approx(2 / 4)  # benzene, CC#N
    with pytest.raises(ValueError):
        validity_uniqueness_novelty([], None, train)


def test_evaluate_molecules_on_training_copies(qm9, tmp_path, monkeypatch):
    import graph.mol_metrics as mm

    monkeypatch.setattr(mm, "STATS_CACHE", tmp_path / "cache")
    idx = list(range(100, 160))
    x, adj, flags = qm9["x"][idx], qm9["adj"][idx], qm9["flags"][idx]
    x = torch.cat([x, x[:20]])  # 20 duplicates
    adj, flags = torch.cat([adj, adj[:20]]), torch.cat([flags, flags[:20]])
    train = [qm9["smiles"][i] for i in range(100, 130)]  # half of the distinct molecules are training copies
    m = evaluate_molecules(x, adj, flags, train, qm9["smiles"][300:400], fcd_metric=False, out_dir=tmp_path)
    uncharged = [s for s in qm9["smiles"][100:160] if "+" not in s]
    assert m["n_samples"] == 80 and m["validity"] == 1.0
    assert m["validity_wo_correction"] == 1.0
    n_unique = len(set(qm9["smiles"][100:160]))
    assert m["uniqueness"] == pytest.approx(n_unique / 80)
    assert m["novelty"] == pytest.approx(len(set(qm9["smiles"][130:160]) - set(train)) / n_unique)
    assert m["nspdk_mmd"] > 0 and len(uncharged) > 0
    assert len(list((tmp_path / "cache").glob("mol_test_nspdk_*.pt"))) == 1  # test statistics kept on disk
    monkeypatch.setattr(mm, "_TEST_STATS", {})  # a new process: the statistics come back from the disk
    embedded, embed = [], mm.nspdk_mean_embedding
    monkeypatch.setattr(mm, "nspdk_mean_embedding", lambda g, **o: embedded.append(len(g)) or embed(g, **o))
    again = evaluate_molecules(x, adj, flags, train, qm9["smiles"][300:400], fcd_metric=False)
    assert len(embedded) == 1  # only the generated set is embedded; the test set's mean is read back
    assert again["nspdk_mmd"] == m["nspdk_mmd"]
    # outputs: SMILES, an SDF that RDKit reads back, a PNG grid
    assert len((tmp_path / "smiles.txt").read_text().splitlines()) == 80
    assert sum(1 for mol in Chem.SDMolSupplier(str(tmp_path / "molecules.sdf")) if mol is not None) == 80
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (8 * 200, 4 * 200)


def test_outputs_skip_failed(tmp_path):
    mols = [Chem.MolFromSmiles("CCO"), None, Chem.MolFromSmiles("c1ccncc1")]
    write_smiles(tmp_path / "s.txt", ["CCO", None, "c1ccncc1"])
    write_sdf(tmp_path / "m.sdf", mols)
    draw_grid(tmp_path / "g.png", mols, per_row=2, size=100)
    assert (tmp_path / "s.txt").read_text() == "CCO sample_0\nc1ccncc1 sample_2\n"  # named as in the SDF
    assert read_smiles_file(tmp_path / "s.txt") == (["CCO", "c1ccncc1"], [])  # and read back as SMILES
    back = [Chem.MolToSmiles(m) for m in Chem.SDMolSupplier(str(tmp_path / "m.sdf"))]
    assert back == ["CCO", "c1ccncc1"]
    with pytest.raises(ValueError):
        draw_grid(tmp_path / "none.png", [None])


def _permuted(mol, seed):
    order = np.random.default_rng(seed).permutation(mol.GetNumAtoms()).tolist()
    return Chem.RenumberAtoms(mol, order)


def test_nspdk_isomorphism_invariance_and_normalisation(qm9):
    mols = [Chem.MolFromSmiles(s) for s in qm9["smiles"][200:240]]
    a = nspdk_features(mols)
    b = nspdk_features([_permuted(m, i) for i, m in enumerate(mols)])
    assert abs(a - b).max() < 1e-12  # isomorphic graphs: the same vectors (up to summation order)
    assert (a != 0).nnz == (b != 0).nnz
    assert np.allclose(np.asarray(a.multiply(a).sum(1)).ravel(), 1.0)  # unit rows, like EDeN's
    # distinct molecules get distinct vectors: C-C-O vs C-O-C
    v = nspdk_features([Chem.MolFromSmiles("CCO"), Chem.MolFromSmiles("COC")])
    assert (v[0] @ v[1].T).toarray()[0, 0] < 0.99
    # edge labels matter: ethane vs ethylene
    v = nspdk_features(mols_to_nx([Chem.MolFromSmiles("CC"), Chem.MolFromSmiles("C=C")]))
    assert (v[0] @ v[1].T).toarray()[0, 0] < 0.99


def test_nspdk_mmd_identity_and_sign(qm9):
    mols = [Chem.MolFromSmiles(s) for s in qm9["smiles"]]
    x, y = mols[300:360], mols[400:440]
    # MMD as GDSS computes it, from the explicit linear kernel matrices
    fx, fy = nspdk_features(x), nspdk_features(y)
    kxx, kyy, kxy = (fx @ fx.T).toarray(), (fy @ fy.T).toarray(), (fx @ fy.T).toarray()
    brute = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    assert nspdk_mmd(x, y) == pytest.approx(brute, rel=1e-9)
    assert nspdk_mmd(x, x) == 0.0
    assert nspdk_mmd(x, [_permuted(m, 7) for m in x]) == pytest.approx(0.0, abs=1e-15)
    small = [Chem.MolFromSmiles(s) for s in ("C", "N", "O", "CC", "CO")]
    assert nspdk_mmd(x, small) > brute > 0  # tiny molecules are further from x than another QM9 slice
    emb = nspdk_mean_embedding(y)
    assert nspdk_mmd(x, emb) == pytest.approx(brute, rel=1e-9)


def test_fcd_self_zero_and_qm9_vs_moses(qm9):
    from graph.mol_metrics import fcd_stats

    sq, sm = fcd_stats(qm9["smiles"][100:300]), fcd_stats(moses_smiles("test")[:200])
    assert abs(fcd(sq, sq)) < 1e-3
    assert fcd(sq, sm) > 20  # small QM9 molecules vs drug-like MOSES ones


@pytest.mark.slow
def test_fcd_within_qm9_far_below_qm9_vs_moses(qm9):
    q, m = qm9["smiles"][100:400], moses_smiles("test")[:300]
    half, far = fcd(q[:150], q[150:]), fcd(q, m)
    assert far > 20 and far > 3 * half


# --------------------------------------------------------------------- official pretrained model


def _checkpoint():
    for root in (os.environ.get("GDSS_CHECKPOINTS"), "/tmp/gdss_ckpt"):
        if root:
            for p in (Path(root) / "gdss_qm9.pth", Path(root) / "QM9" / "gdss_qm9.pth"):
                if p.is_file():
                    return p
    pytest.skip("the official gdss_qm9.pth is not available (set GDSS_CHECKPOINTS)")


@pytest.mark.slow
def test_pretrained_qm9_validity(qm9):
    """256 molecules from the official QM9 weights (GDSS sample_qm9.yaml sampler, 1000 steps, NFE 2000):
    validity without correction near GDSS's 95.7%, far above the same decoding of the prior's samples."""
    from graph.gdss import gdss_sample, gdss_system
    from graph.model import load_gdss_checkpoint

    ckpt = load_gdss_checkpoint(_checkpoint())
    system = gdss_system(ckpt["config"]["sde"]["x"], ckpt["config"]["sde"]["adj"])
    g = torch.Generator().manual_seed(0)
    flags = qm9["flags"][200:][torch.randint(0, 400, (256,), generator=g)]
    x, adj, nfe = gdss_sample(
        ckpt["model_x"], ckpt["model_adj"], system, flags, 4, steps=1000, generator=g,
        predictor="reverse_diffusion", corrector="langevin", snr=0.2, scale_eps=0.7,
    )
    assert nfe == 2000
    valid = np.mean(decode_molecules(x, adj, flags, QM9_ATOMS)["valid_wo_correction"])
    prior = system.prior_sample([(256, 9, 4), (256, 9, 9)], flags, g)
    prior_valid = np.mean(decode_molecules(prior[0], prior[1], flags, QM9_ATOMS)["valid_wo_correction"])
    assert valid > 0.9 and valid > prior_valid + 0.3
