"""Bad pipelines fail with one message naming the stage and key, before any cluster is reached or any job
submitted; the shipped pipelines parse; the state document survives a round trip."""

from __future__ import annotations

import pytest
import torch
import yaml
from coordkit import write_pipeline
from safetensors.torch import save_file

from kitdist.coordinator.__main__ import main
from kitdist.coordinator.spec import load_pipeline
from kitdist.coordinator.state import Attempt, State, new_state


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> dict[str, str]:
    from kitdist.coordinator.demo import ensure_demo_shards

    return ensure_demo_shards(str(tmp_path_factory.mktemp("demo-data")))


def run_fails(path, capsys, monkeypatch) -> str:
    # An address nothing listens on: reaching for the cluster would fail differently and much later.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    assert main(["run", str(path)]) == 2
    assert not (path.parent / "state" / "state.json").exists()  # nothing ran, no state written
    return capsys.readouterr().err


def edit(path, change) -> None:
    tree = yaml.safe_load(path.read_text())
    change(tree)
    path.write_text(yaml.safe_dump(tree))


def test_unknown_task(tmp_path, demo_data, capsys, monkeypatch):
    path = write_pipeline(tmp_path / "p.yaml", demo_data)
    edit(path, lambda t: t["finetune"][1].update(task="superresolve"))
    err = run_fails(path, capsys, monkeypatch)
    assert "finetune[1].task: unknown task 'superresolve'" in err and "denoise" in err


def test_missing_dataset(tmp_path, demo_data, capsys, monkeypatch):
    path = write_pipeline(tmp_path / "p.yaml", demo_data)
    edit(path, lambda t: t["finetune"][0].update(train_shards=str(tmp_path / "no-such-set")))
    err = run_fails(path, capsys, monkeypatch)
    assert "stage denoise: data.train_shards" in err and "no-such-set" in err


def test_missing_test_shards(tmp_path, demo_data, capsys, monkeypatch):
    path = write_pipeline(tmp_path / "p.yaml", demo_data)
    edit(path, lambda t: t["finetune"][0].pop("test_shards"))
    assert "finetune[0].test_shards: missing" in run_fails(path, capsys, monkeypatch)


def test_fine_tune_model_must_match_the_pretrained_one(tmp_path, demo_data, capsys, monkeypatch):
    path = write_pipeline(tmp_path / "p.yaml", demo_data)
    edit(path, lambda t: t["finetune"][1]["overrides"].append("model.size=small"))
    err = run_fails(path, capsys, monkeypatch)
    assert "stage deblur: model (size 'small') does not match the pre-trained model" in err


def test_a_fine_tune_on_clean_shards_needs_a_degradation(tmp_path, demo_data, capsys, monkeypatch):
    path = write_pipeline(tmp_path / "p.yaml", demo_data)
    clean = ["data.kind=clean", "degrade.noise_prob=0"]
    edit(
        path,
        lambda t: t["finetune"][0].update(
            train_shards=demo_data["photos_train"], val_shards="", overrides=clean
        ),
    )
    err = run_fails(path, capsys, monkeypatch)
    assert "stage denoise: " in err and "data.kind: a fine-tune on clean shards" in err


def test_named_checkpoint_of_another_size(tmp_path, demo_data, capsys, monkeypatch):
    weights = tmp_path / "weights.safetensors"
    save_file({"conv_in.weight": torch.zeros(7, 3, 3, 3)}, str(weights))
    path = write_pipeline(tmp_path / "p.yaml", demo_data, pretrain={"weights": str(weights)})
    err = run_fails(path, capsys, monkeypatch)
    assert "does not match the pre-trained model of" in err and str(weights) in err


def test_bad_run_config_key_names_stage_and_key(tmp_path, demo_data, capsys, monkeypatch):
    path = write_pipeline(tmp_path / "p.yaml", demo_data)
    edit(path, lambda t: t["pretrain"]["overrides"].append("train.max_step=3"))
    err = run_fails(path, capsys, monkeypatch)
    assert "stage pretrain" in err and "train.max_step: unknown key" in err


def test_shipped_pipelines_parse():
    kit = load_pipeline("configs/pipeline/kit.yaml")
    assert [t.task for t in kit.finetune] == ["denoise", "deblur", "derain", "deblur_jpeg"]
    assert load_pipeline("configs/pipeline/demo.yaml").demo_data


def test_state_round_trip():
    state = new_state("p", {"pretrain": "pretrain", "finetune/a": "finetune"})
    state.stages["pretrain"].attempts.append(Attempt(job_id="j1", status="FAILED", started=1.0, ended=3.5))
    again = State.from_json(state.to_json(), "test")
    assert (
        again == state and again.stages["pretrain"].failures == 1 and again.stages["pretrain"].wall_s == 2.5
    )


def test_local_cluster_ports_never_meet_its_worker_port_range(monkeypatch):
    """The component ports of a local cluster are free ports outside its worker-port range and distinct:
    free ports that fall inside the range (as 53095 once did) or repeat are passed over."""
    from kitdist.coordinator import cluster

    seed = 331  # places the worker range at 53100-53199, inside the kernel's ephemeral ports
    offered = iter([53100, 53150, 41000, 41000, 53199, *range(41001, 41100)])
    monkeypatch.setattr(cluster, "_free_port", lambda: next(offered))
    ports, workers = cluster.choose_ports(seed)
    assert workers == range(53100, 53200)
    assert list(ports) == list(cluster.PORT_NAMES)
    assert list(ports.values()) == [41000, *range(41001, 41000 + len(cluster.PORT_NAMES))]


@pytest.mark.parametrize("seed", [0, 1, 331, 399, 4242])
def test_local_cluster_ports_chosen_for_real_are_distinct_and_outside_the_range(seed):
    from kitdist.coordinator.cluster import choose_ports

    ports, workers = choose_ports(seed)
    assert len(set(ports.values())) == len(ports)
    assert not set(ports.values()) & set(workers) and len(workers) == 100 and 20000 <= workers[0] < 60000


def test_job_that_failed_with_an_error_no_retry_can_fix_is_recognised_from_its_log():
    """The coordinator does not resubmit a job whose training ended with an error no retry can fix (the
    line `python -m kitdist.pretrain` prints for it); any other failure is resubmitted."""
    from kitdist.coordinator.pipeline import no_retry_error
    from kitdist.failures import NO_RETRY_MARK

    line = f"error: resume: rank 0's state has seed=0, this run has 1 (raised in a training worker; {NO_RETRY_MARK})"
    tail = f"(TrainController pid=1) Started training worker group of size 2\n{line}\n"
    assert no_retry_error(tail) == line
    assert no_retry_error("error: s3://b/runs: StorageError: Connect timeout\n") == ""
    assert no_retry_error("(RayTrainWorker pid=2) Killed\nTraceback (most recent call last):\n") == ""


def test_every_training_job_reproduces_its_planned_config(tmp_path, demo_data):
    """A job's command line (config file + overrides, written from the plan's typed values) loads to the
    config the plan checked, wherever the job runs: paths absolute, the run named after the stage."""
    from kitdist.config import load_config
    from kitdist.config_loader import replace_values
    from kitdist.coordinator.plan import make_plan

    plan = make_plan(load_pipeline(write_pipeline(tmp_path / "p.yaml", demo_data)))
    weights = str(tmp_path / "w" / "weights.safetensors")
    for train in [plan.pretrain, *plan.finetunes.values()]:
        argv = train.job(weights).entrypoint
        assert argv[argv.index("--config") + 1] == train.config_path
        cfg = load_config(train.config_path, argv[argv.index("--config") + 2 :])
        assert cfg == replace_values(train.cfg, {"train.init_weights": weights})
        assert cfg.storage.run_name == f"t-{train.stage}" and cfg.storage.root == str(tmp_path / "runs")
