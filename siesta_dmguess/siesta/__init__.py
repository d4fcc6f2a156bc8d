"""Running a user's SIESTA: locate it, prepare run folders with a DM-initialisation template, parse its output."""

from .output import ScfStep, SiestaOutput, parse_output
from .runner import SiestaRun, find_siesta, run_siesta
from .templates import TEMPLATES, apply_dm_init, prepare_run, template_path

__all__ = ["ScfStep", "SiestaOutput", "parse_output", "SiestaRun", "find_siesta", "run_siesta", "TEMPLATES",
           "apply_dm_init", "prepare_run", "template_path"]
