"""Parsing SIESTA outputs: the real ones in ../shared and truncated / failed ones."""

import gzip
import json
import re
import zlib

import pytest

from siesta_dmguess.siesta import parse_output

from .conftest import dataset


@pytest.mark.parametrize("name", ["h2o", "water8", "rotations", "g2", "si8"])
def test_real_outputs_match_index(name):
    root = dataset(name)
    for rec in json.loads((root / "index.json").read_text()):
        out = parse_output(root / rec["id"] / "siesta.out.gz")
        assert out.scf_iterations == rec["scf_iterations_atomic_guess"]
        assert out.total_energy_eV == pytest.approx(rec["total_energy_eV"], abs=1e-5)
        assert out.converged and out.job_completed and not out.dm_read_from_file
        assert out.version == "master-post-4.1-268"
        assert out.scf_history[-1].dDmax <= 1e-5 < out.scf_history[0].dDmax  # printed with 6 decimals
        assert out.wall_s == pytest.approx(rec["siesta_wall_s"], rel=0.05, abs=0.05)
        fdf_tolerance = next(line.split()[1] for line in (root / rec["id"] / "input.fdf").read_text().splitlines()
                             if line.lower().startswith("dm.tolerance"))
        assert out.dm_tolerance == pytest.approx(float(fdf_tolerance.lower().replace("d", "e")))


def _text():
    path = dataset("h2o") / "0000" / "siesta.out.gz"
    with gzip.open(path, "rt") as f:
        return f.read()


def test_scf_lines_are_read_by_siestas_fixed_fields_where_values_touch():
    """SIESTA writes each scf: line as '(a8,i4,3f16.6,3f10.6)': a Fermi level below -10 eV fills its field and
    touches the dDmax before it, and a value too large for its field prints as stars. Split at blanks, the first
    line read dDmax '0.000077-12.131650' as one word and took the next line's first number as a seventh."""
    text = ("   scf:    1     -465.790057     -465.790027     -465.790027  0.000077-12.131650  0.001198\n"
            "   scf:    2     -465.790027     -465.790027     -465.790027**********-12.131401  0.000449\n"
            "   scf:    3     -465.790027     -465.790027     -465.790027  0.000009 -2.131401  0.000449\n"
            "SCF cycle converged after 3 iterations\n")
    steps = parse_output(text).scf_history
    assert [s.iscf for s in steps] == [1, 2, 3]
    assert steps[0].dDmax == 7.7e-05 and steps[0].ef_eV == -12.13165 and steps[0].dHmax_eV == 0.001198
    assert steps[1].dDmax != steps[1].dDmax and steps[1].ef_eV == -12.131401  # NaN: overflowed
    assert steps[2].dDmax == 9e-06 and steps[2].ef_eV == -2.131401


def test_truncated_output_is_not_converged():
    text = _text()
    cut = text[: text.index("   scf:    5")]
    out = parse_output(cut)
    assert out.scf_iterations == 4 and not out.converged and not out.job_completed
    assert out.total_energy_eV == pytest.approx(out.scf_history[-1].e_ks_eV)
    assert out.band_energy_eV is None  # only the starting DM's Ebs was printed, before the SCF
    assert parse_output(text).band_energy_eV is not None


def test_a_gzipped_output_cut_short_is_read_as_far_as_it_goes(tmp_path):
    """A copied .out.gz cut short (or not gzip at all) was a bare EOFError; it reads as a plain output cut short:
    the SCF steps it holds, not converged."""
    text = _text()
    packed = gzip.compress(text.encode())
    cut = tmp_path / "cut.out.gz"
    # the gzip stream of the text up to the middle of its SCF, and no further
    middle = text.index("   scf:    5")
    stream = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    cut.write_bytes(stream.compress(text[:middle].encode()) + stream.flush(zlib.Z_SYNC_FLUSH))
    out = parse_output(cut)
    assert not out.converged and out.scf_iterations == 4
    assert out.scf_history[0] == parse_output(text).scf_history[0]
    (tmp_path / "plain.out.gz").write_text("not gzip\n")
    assert not parse_output(tmp_path / "plain.out.gz").converged
    whole = tmp_path / "whole.out.gz"
    whole.write_bytes(packed)
    assert parse_output(whole) == parse_output(text)


def test_what_a_run_says_anywhere_counts_and_the_starting_dm_is_the_first(tmp_path):
    """Parts of the parser no test reached: a later geometry step's "SCF_NOT_CONV" makes the run unconverged
    though an earlier step converged; an .out.gz of several gzip members (concatenated) is read whole; a DM
    tolerance printed as 0.000000 says nothing; the starting DM's charge is the first one SIESTA printed (the DM
    read from file), not a later step's."""
    text = _text()
    assert parse_output(text).converged
    assert not parse_output(text + "\nSCF_NOT_CONV: SCF did not converge in maximum number of steps.\n").converged
    half = text.index("   scf:    5")
    members = tmp_path / "members.out.gz"
    members.write_bytes(gzip.compress(text[:half].encode()) + gzip.compress(text[half:].encode()))
    assert parse_output(members) == parse_output(text)
    assert parse_output(text).dm_tolerance == 1e-5
    zero = re.sub(r"(redata: DM tolerance for SCF\s*=\s*)\S+", r"\g<1>0.000000", text)
    assert parse_output(zero).dm_tolerance is None
    two = text + "\nFor starting DM, Qtot, Tr[D*S] =          8.00000000          7.50000000\n"
    first = "For starting DM, Qtot, Tr[D*S] =          8.00000000          8.01000000\n"
    out = parse_output(first + two)
    assert out.start_dm_electrons == pytest.approx(8.01) and out.electrons == pytest.approx(8.0)


def test_dm_read_succeeded_and_failed():
    text = _text()
    ok = parse_output(text.replace("redata:", "Attempting to read DM from file... Succeeded...\nredata:", 1))
    failed = parse_output(text.replace("redata:", "Attempting to read DM from file... Failed...\nredata:", 1))
    assert ok.dm_read_from_file and not failed.dm_read_from_file


def test_multi_step_run_keeps_each_scf_cycle():
    text = _text()
    scf = text[text.index("        iscf"): text.index("SCF cycle converged")]
    out = parse_output(text + scf.replace("   scf:    9", "") )
    assert out.scf_iterations_per_step == [9, 8]
    assert out.scf_iterations == 8


def test_the_bench_plot_draws_the_runs_own_dm_tolerance(tmp_path, monkeypatch):
    """The dDmax panel's stopping line is the DM.Tolerance SIESTA printed, one line per value, none if unknown."""
    import matplotlib.figure

    from siesta_dmguess.bench import GuessResult, StructureResult, plot

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(
        [line.get_label() for line in fig.axes[1].get_lines() if line.get_label().startswith("DM.Tolerance")]))

    def row(name, tolerance):
        return StructureResult(name, 3, {g: GuessResult(g, 3, True, g == "ml", -1.0, 1.0, dDmax=[1e-2, 1e-3, 1e-5],
                                                        dm_tolerance=tolerance) for g in ("atomic", "ml")})

    plot([row("a", 1e-4), row("b", 1e-4)], tmp_path / "p.png")
    plot([row("a", 1e-4), row("b", 1e-6)], tmp_path / "p.png")
    plot([row("a", None)], tmp_path / "p.png")
    assert drawn == [["DM.Tolerance 0.0001"], ["DM.Tolerance 1e-06", "DM.Tolerance 0.0001"], []]
