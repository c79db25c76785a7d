r"""The offline end-to-end demo (README quickstart):

  python -m b4b_jax.main --config=configs/demo.py --workdir=/tmp/b4b_demo

A SimSiam victim trained on bundled data is served through B4B; a legit digits user, an undefended
thief, a B4B-defended thief and B4B sybils query it; every copy is probed; report.md, results.json,
PNG plots and TensorBoard logs land in the workdir, and the Table-1-layout summary is printed.
Re-running with the same workdir resumes (finished stages are reused; the stealing runs resume from
their own checkpoints).
"""
import contextlib
import os

from absl import logging

from b4b_jax import models as models_lib
from b4b_jax.demo import pipeline
from b4b_jax.demo import report as demo_report
from b4b_jax.demo import served as served_lib
from b4b_jax.demo.stages import StageRunner
from b4b_jax.jobs.runner import run_job
from b4b_jax.evaluation import report as report_lib
from b4b_jax.utils import metrics as metrics_lib

STAGES = ("victim", "calibration", "legit", "attack_undefended", "attack_b4b", "attack_sybil", "probes",
          "remap")


def run(config, workdir: str) -> dict:
  writer = metrics_lib.MetricsWriter(workdir)
  stages = StageRunner(workdir, STAGES)
  data = pipeline.load_data(config)

  # ------------------------------------------------------------------ the victim and its defense
  stages.run("victim", lambda: pipeline.train_victim(config, data, workdir, writer))
  victim = models_lib.load_encoder(os.path.join(workdir, pipeline.VICTIM_DIR))
  calib = stages.run("calibration", lambda: pipeline.calibrate(config, victim, data))
  defense_cfg = pipeline.defended_config(config, calib)

  # ------------------------------------------------------------------ users of the API
  served_info = {}

  def serving(stage):  # served=1: a fresh B4B server on loopback for this stage's users
    if not config.get("served"):
      return contextlib.nullcontext(None)
    return served_lib.server(config, workdir, stage, os.path.join(workdir, pipeline.VICTIM_DIR),
                             defense_cfg)

  def legit():
    with serving("legit") as srv:
      if srv is None:
        return pipeline.legit_users(config, victim, data, defense_cfg)
      served_info["legit"] = srv.summary()
      return pipeline.legit_users(config, victim, data, defense_cfg, api=srv.api())

  stages.run("legit", legit)
  attack_dirs = {}
  for name, defended, accounts in (("attack_undefended", False, 1), ("attack_b4b", True, 1),
                                   ("attack_sybil", True, int(config.attack.sybil_accounts))):
    subdir = os.path.join(workdir, pipeline.ATTACKS_DIR, name)
    attack_dirs[name] = subdir

    def steal(name=name, subdir=subdir, defended=defended, accounts=accounts):
      with serving(name) if defended else contextlib.nullcontext(None) as srv:
        if srv is not None:
          served_info[name] = srv.summary()
        cfg = pipeline.steal_config(config, workdir, defended=defended, accounts=accounts,
                                    defense_cfg=defense_cfg, served=srv)
        return pipeline.attack_summary(run_job(cfg, subdir))

    stages.run(name, steal)

  # ------------------------------------------------------------------ evaluation
  stages.run("probes", lambda: pipeline.probes(config, victim, data, attack_dirs, workdir))
  stages.run("remap", lambda: pipeline.remapping(config, victim, data, defense_cfg))

  # ------------------------------------------------------------------ report (always rewritten)
  results = dict(stages.results)
  results["stage_seconds"] = dict(stages.seconds)
  if config.get("served"):
    results["served"] = _served_stages(workdir, served_info)
  table = report_lib.table1(demo_report.summary_rows(results, config), paper_table=None,
                            datasets=["digits"])
  results["table1"] = {"headers": table["headers"], "rows": table["rows"]}
  results["claims"] = demo_report.claims(results, config)
  plots = demo_report.plots(results, workdir)
  report_lib.write_experiment(workdir, "B4B end-to-end demo", results, config=config,
                              sections=demo_report.sections(results, config, table["markdown"]) + (
                                  [("Served over HTTP", served_lib.note(results))]
                                  if results.get("served") else []),
                              plots=plots)
  writer.write_scalars(0, {"legit_b4b_top1": results["legit"]["b4b"]["test_top1_mean"],
                           **{f"{n}_fidelity": results["probes"][n]["fidelity_r2"]
                              for n in attack_dirs}}, stage="demo")
  writer.close()
  print("\n" + table["markdown"] + "\n")
  if results.get("served"):
    print(served_lib.note(results) + "\n")
  for c in results["claims"]:
    print(f"- {c['claim']}: {c['verdict'] if c['holds'] else c['verdict'].upper()} ({c['evidence']})")
  print(f"\nreport: {os.path.join(workdir, 'report.md')}")
  logging.info("demo finished: %s", os.path.join(workdir, "report.md"))
  return results


def _served_stages(workdir: str, this_run: dict) -> dict:
  """{stage: how it was served}: this run's servers, and those of stages an earlier run served."""
  out = {}
  for stage in ("legit", "attack_b4b", "attack_sybil"):
    if stage in this_run:
      out[stage] = this_run[stage]
    elif os.path.isdir(os.path.join(workdir, served_lib.SERVED_DIR, stage)):
      out[stage] = {"workdir": os.path.join(workdir, served_lib.SERVED_DIR, stage),
                    "served_in": "an earlier run"}
  return out
