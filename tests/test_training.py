"""Fine-tuning after pruning: distillation, the learning-rate schedule, checkpoints and resuming, devices.

Real SpikingJelly Spikformers trained on scikit-learn's digits; the device tests run on
every device torch sees here (the CPU, and CUDA where there is a GPU).
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch.utils.data import DataLoader, TensorDataset

from primesvt_plugin.builtins.exporters import to_torchscript
from primesvt_plugin.errors import ArgumentError, CheckpointError, RecipeError
from primesvt_plugin.pipeline import training
from primesvt_plugin.pipeline.cli import main
from primesvt_plugin.pipeline.readers import digits_splits
from primesvt_plugin.pipeline.output import resume_folder
from primesvt_plugin.pipeline.recipe import load_recipe
from primesvt_plugin.pipeline.runner import run_recipe
from primesvt_plugin.pipeline.distillation import Distillation, distillation_loss, frozen_copy, teacher_scores
from primesvt_plugin.pipeline.checkpoints import TrainingState, read_checkpoint
from primesvt_plugin.pipeline.evaluation import accuracy, logits
from primesvt_plugin.pipeline.schedule import lr_factor, lr_scheduler
from primesvt_plugin.pipeline.devices import resolve_device
from primesvt_plugin.pipeline.training import train
from primesvt_plugin.plugins import build_model
from primesvt_plugin.pruning.graph import SpikingGraph
from primesvt_plugin.pruning.masking import Masks
from primesvt_plugin.pruning.memory import LedgerState, footprint, layer_outputs
from primesvt_plugin.pruning.policy import prime
from primesvt_plugin.pruning.pruner import SpikingPruner, apply_plan
from primesvt_plugin.pruning.spiking import fresh_forward, model_device

from svits import build, param_count

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DIGITS_ARGS = dict(T=2, in_channels=1, img_size_h=16, img_size_w=16, patch_size=4, num_classes=10, embed_dims=32,
                   num_heads=4, mlp_ratio=4, depths=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a small shared machine torch's threads mostly wait for each other
    (measured 10x slower with 2 threads under load), so each test runs on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return digits_splits(image_size=16)


def digits_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("spikformer", DIGITS_ARGS)


@pytest.fixture(scope="module")
def teacher(digits):
    """A Spikformer that has learned digits (the unpruned model of a recipe)."""
    model = digits_model()
    train(model, digits.loader("train", 32, shuffle=True), epochs=4, lr=5e-3, progress=False)  # 75% val accuracy
    return model.eval()


def kl_and_agreement(student, teacher, loader) -> tuple[float, float]:
    """Mean KL(teacher || student) of the class scores and top-1 agreement, over ``loader``."""
    kl, agree, n = 0.0, 0, 0
    for x, _ in loader:
        s, t = teacher_scores(student, x), teacher_scores(teacher, x)
        kl += float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="sum", log_target=True))
        agree += int((s.argmax(1) == t.argmax(1)).sum())
        n += len(x)
    return kl / n, agree / n


# -- distillation ----------------------------------------------------------------------


def test_distillation_loss_is_the_weighted_sum_of_cross_entropy_and_softened_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    w, T = 0.3, 3.0
    p_teacher = F.softmax(teacher / T, 1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / T, 1))).sum(1).mean()
    expected = (1 - w) * F.cross_entropy(student, labels) + w * T * T * kl
    torch.testing.assert_close(distillation_loss(student, teacher, labels, w, T), expected)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, 0.0, T), F.cross_entropy(student, labels))
    assert float(distillation_loss(student, student, labels, 1.0, T)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ArgumentError, match="weight"):
        Distillation(torch.nn.Linear(1, 1), weight=1.5)
    with pytest.raises(ArgumentError, match="temperature"):
        Distillation(torch.nn.Linear(1, 1), temperature=0.0)


def test_teacher_scores_are_time_averaged_without_gradients_from_a_fresh_state(teacher, digits):
    x = torch.from_numpy(digits.x_val[:4])
    copy_ = frozen_copy(teacher)
    assert not copy_.training and not any(p.requires_grad for p in copy_.parameters())
    copy_.train()  # even a teacher left in train mode is run in eval mode, and its mode is put back
    scores = teacher_scores(copy_, x)
    assert copy_.training and not scores.requires_grad and scores.shape == (4, 10)
    torch.testing.assert_close(scores, fresh_forward(teacher, x).mean(0))  # [T, N, K] averaged over T
    torch.testing.assert_close(teacher_scores(copy_, x), scores)  # the state was reset: same scores again


def test_distillation_pulls_the_pruned_student_towards_the_teacher(teacher, digits):
    """Weight 1 is pure distillation: trained on random labels, the student still learns, from the teacher."""
    student = copy.deepcopy(teacher)
    SpikingPruner(student, torch.from_numpy(digits.x_val[:2]), pruning_ratio=0.5).step()
    teacher_before = copy.deepcopy(teacher.state_dict())
    val = digits.loader("val", 512)
    kl_before, agreement_before = kl_and_agreement(student, teacher, val)
    noise = torch.randint(0, 10, (len(digits.y_train),), generator=torch.Generator().manual_seed(0))
    random_labels = DataLoader(TensorDataset(torch.from_numpy(digits.x_train), noise), batch_size=64, shuffle=True,
                               generator=torch.Generator().manual_seed(1))
    losses = train(student, random_labels, 2, lr=1e-3, seed=1, progress=False,
                   distill=Distillation(frozen_copy(teacher), weight=1.0, temperature=4.0))
    kl_after, agreement_after = kl_and_agreement(student, teacher, val)
    assert losses[1] < losses[0]  # the distillation loss falls on the training data...
    assert kl_after < 0.75 * kl_before  # ...and on held-out data the student's scores approach the teacher's
    assert agreement_after > agreement_before + 0.1, (agreement_before, agreement_after)  # measured 36% -> 53%
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())  # the teacher learns nothing


# -- learning-rate schedule -------------------------------------------------------------


def rates(schedule: str, total: int, warmup: int, lr: float = 0.1) -> list[float]:
    """The learning rate of each optimizer step 0 .. total (the last: after training)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = lr_scheduler(optimizer, total, warmup, schedule)
    seen = []
    for _ in range(total + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_then_cosine_or_constant_rates_at_given_steps():
    cosine = rates("cosine", total=10, warmup=2)
    assert cosine[0] == pytest.approx(0.05) and cosine[1] == pytest.approx(0.1)  # linear warm-up, never 0
    assert cosine[2] == pytest.approx(0.1)  # the cosine starts at the full rate...
    assert cosine[6] == pytest.approx(0.05)  # ...is half-way down half-way through the rest...
    assert cosine[10] == pytest.approx(0.0, abs=1e-12)  # ...and 0 at the end
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:]))
    constant = rates("constant", total=10, warmup=4)
    assert constant[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1]) and constant[4:] == pytest.approx([0.1] * 7)
    assert rates("constant", total=5, warmup=0) == pytest.approx([0.1] * 6)
    assert lr_factor(7, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 8)))


def test_without_warmup_the_cosine_is_the_schedule_training_always_had():
    """Default recipes keep their results: the default is CosineAnnealingLR's schedule, step for step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    before = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=40)
    expected = []
    for _ in range(41):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        before.step()
    assert rates("cosine", total=40, warmup=0) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ArgumentError, match="schedule"):
        lr_scheduler(optimizer, 10, 0, "linear")


# -- checkpoints and resuming -------------------------------------------------------------


class Batches:
    """A loader's batches, counted; ``stop_at=(epoch, batch)`` raises KeyboardInterrupt there (Ctrl-C)."""

    def __init__(self, loader, stop_at: tuple[int, int] | None = None):
        self.loader, self.stop_at = loader, stop_at
        self.generator = loader.generator  # what shuffles: checkpoints save and restore it
        self.batches = self.epochs = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.epochs += 1
        for number, batch in enumerate(self.loader, 1):
            if (self.epochs, number) == self.stop_at:
                raise KeyboardInterrupt
            self.batches += 1
            yield batch


def test_a_resumed_run_skips_finished_epochs_and_ends_where_an_uninterrupted_one_does(digits, tmp_path):
    def loader(stop_at=None):
        return Batches(digits.loader("train", 64, shuffle=True, seed=1, limit=320), stop_at)

    options = dict(lr=3e-3, seed=1, progress=False, schedule="cosine", warmup_epochs=1)
    whole = digits_model()
    whole_losses = train(whole, loader(), 3, checkpoint=tmp_path / "whole.pt", **options)
    saved = read_checkpoint(tmp_path / "whole.pt")
    assert saved["epoch"] == 3 and saved["losses"] == whole_losses
    assert saved["scheduler"]["_last_lr"] == pytest.approx([0.0], abs=1e-12)  # the cosine ended at 0

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the 3rd batch of epoch 2
        train(digits_model(), loader(stop_at=(2, 3)), 3, checkpoint=tmp_path / "cut.pt", **options)
    assert read_checkpoint(tmp_path / "cut.pt")["epoch"] == 1

    resumed, batches = digits_model(), loader()  # a new process: the model is built again
    losses = train(resumed, batches, 3, checkpoint=tmp_path / "cut.pt", resume=True, **options)
    assert batches.epochs == 2 and batches.batches == 2 * len(batches)  # epoch 1 was skipped
    assert losses == whole_losses
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())
    assert read_checkpoint(tmp_path / "cut.pt")["epoch"] == 3

    finished, batches = digits_model(), loader()  # resuming a finished run trains nothing
    assert train(finished, batches, 3, checkpoint=tmp_path / "whole.pt", resume=True, **options) == whole_losses
    assert batches.batches == 0
    assert all(torch.equal(v, finished.state_dict()[k]) for k, v in whole.state_dict().items())


def test_resuming_refuses_checkpoints_of_other_settings_or_models_and_damaged_files(digits, tmp_path):
    loader = digits.loader("train", 64, shuffle=True, limit=128)
    path = tmp_path / "ckpt.pt"
    train(digits_model(), loader, 1, lr=1e-3, progress=False, checkpoint=path, meta={"recipe": {"seed": 0}})
    with pytest.raises(CheckpointError, match=r"training\.lr=0\.001, this run has 0\.002"):
        train(digits_model(), loader, 1, lr=2e-3, progress=False, checkpoint=path, resume=True,
              meta={"recipe": {"seed": 0}})
    with pytest.raises(CheckpointError, match=r"recipe\.seed=0, this run has 1"):
        train(digits_model(), loader, 1, lr=1e-3, progress=False, checkpoint=path, resume=True,
              meta={"recipe": {"seed": 1}})
    torch.manual_seed(0)
    other = build_model("spikformer", {**DIGITS_ARGS, "embed_dims": 16})
    with pytest.raises(CheckpointError, match="do not fit the model"):
        train(other, loader, 1, lr=1e-3, progress=False, checkpoint=path, resume=True, meta={"recipe": {"seed": 0}})
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):
        train(digits_model(), loader, 1, lr=1e-3, progress=False, checkpoint=path, resume=True)
    fresh = tmp_path / "none.pt"  # nothing to resume: it trains from the first epoch
    assert len(train(digits_model(), loader, 1, progress=False, checkpoint=fresh, resume=True)) == 1
    assert read_checkpoint(fresh)["epoch"] == 1


RECIPE = """\
seed: 0
model: {name: spikformer, checkpoint: teacher.pt, args: {T: 2, in_channels: 1, img_size_h: 16, img_size_w: 16,
        patch_size: 4, num_classes: 10, embed_dims: 32, num_heads: 4, depths: 1}}
data: {name: digits, args: {image_size: 16, test_fraction: 0.5}, val_subset: 90}
prune: {memory_saving: 0.3, max_accuracy_drop: 0.5, rates: [0.3, 0.6]}
finetune: {epochs: 2, lr: 0.001, warmup_epochs: 1, distill: {weight: 0.5, temperature: 4.0}}
"""


def test_primesvt_run_resume_continues_an_interrupted_finetuning(teacher, tmp_path, monkeypatch, capsys):
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")  # trained: the recipe's unpruned model
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    save = TrainingState.save

    def save_then_stop(self, path, losses, *args):  # Ctrl-C right after fine-tuning's first epoch
        save(self, path, losses, *args)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(TrainingState, "save", save_then_stop)
        assert main(["run", str(recipe), "--out", "out", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "nothing was written" in err and "rerun with --resume" in err and ".out.resume" in err
    checkpoint = resume_folder(tmp_path / "out") / "finetune.pt"
    assert read_checkpoint(checkpoint)["epoch"] == 1  # kept beside the output, which was not written
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.resume", "recipe.yaml", "teacher.pt"]

    # another recipe cannot resume it: refused before anything runs, the checkpoint kept
    assert main(["run", str(recipe), "--out", "out", "--quiet", "--resume", "--set", "finetune.lr=0.002"]) == 2
    err = capsys.readouterr().err.strip()
    assert "finetune.lr=0.001, this run has 0.002" in err and len(err.splitlines()) == 1
    assert checkpoint.is_file()

    epochs = []
    run_epoch = training._epoch
    monkeypatch.setattr(training, "_epoch", lambda *args: epochs.append(1) or run_epoch(*args))
    assert main(["run", str(recipe), "--out", "out", "--quiet", "--resume"]) == 0
    assert len(epochs) == 1  # fine-tuning's first epoch came from the checkpoint
    assert not checkpoint.parent.exists()  # done: the output supersedes the checkpoint

    reference = run_recipe(load_recipe(recipe), tmp_path / "reference", progress=False)  # never interrupted
    assert len(epochs) == 1 + 2
    resumed = json.loads((tmp_path / "out" / "report.json").read_text())
    assert without_latency(resumed) == without_latency(reference)
    weights = torch.load(tmp_path / "out" / "state_dict.pt", weights_only=True)
    expected = torch.load(tmp_path / "reference" / "state_dict.pt", weights_only=True)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml", "reference", "teacher.pt"]


def without_latency(report: dict) -> list[dict]:
    return [{k: v for k, v in stage.items() if k != "latency_ms"} for stage in report["stages"]]


def test_recipe_fields_for_schedules_distillation_and_devices(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    loaded = load_recipe(recipe, ["train.epochs=2"])
    assert loaded.device == "auto" and loaded.train.schedule == "cosine" and loaded.train.amp is False
    assert loaded.train.warmup_epochs == 0 and loaded.finetune.schedule == "cosine"  # what training always did
    assert loaded.finetune.distill.weight == 0.5 and loaded.finetune.warmup_epochs == 1
    assert load_recipe(recipe, ["finetune.distill=null"]).finetune.distill is None
    with pytest.raises(RecipeError, match="finetune: .*warmup_epochs \\(3\\) is longer than epochs \\(2\\)"):
        load_recipe(recipe, ["finetune.warmup_epochs=3"])
    with pytest.raises(RecipeError, match="finetune.distill.weight"):
        load_recipe(recipe, ["finetune.distill.weight=2"])
    with pytest.raises(RecipeError, match="device"):
        load_recipe(recipe, ["device=tpu"])
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ArgumentError, match="no CUDA GPU"):
            resolve_device("cuda")
        recipe.write_text(RECIPE.replace("checkpoint: teacher.pt, ", ""))
        assert main(["validate", str(recipe), "--set", "device=cuda"]) == 2  # before anything runs
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "device: cuda: torch sees no CUDA GPU" in err


# -- devices --------------------------------------------------------------------------------


def on_device(name: str, device: str) -> torch.nn.Module:
    return build(name).to(device)


def all_on(model: torch.nn.Module, device: str) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return bool(tensors) and all(t.device.type == device for t in tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_prime_on_a_device_with_an_example_on_the_cpu(device, images):
    model = on_device("spikformer", device)
    reference = fresh_forward(model, images.to(device)).mean(0).argmax(1)

    def agreement(m):  # what evaluate receives: the model on its device
        return float((fresh_forward(m, images.to(device)).mean(0).argmax(1) == reference).float().mean())

    before = copy.deepcopy(model.state_dict())
    result = prime(model, images, agreement, memory_saving=0.3, max_accuracy_drop=1.0, rates=[0.3, 0.6],
                   progress=False)
    report = result.report
    assert report.pruned.memory_saving >= 0.3 and report.plan
    assert report.pruned.predicted_memory == report.pruned.memory == footprint(result.model, images)
    assert all_on(result.model, device) and all_on(model, device)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a copy was pruned
    assert fresh_forward(result.model, images.to(device)).shape[-1] == 10


@pytest.mark.parametrize("device", DEVICES)
def test_spiking_pruner_step_on_a_device(device, images):
    model = on_device("spikformer", device)
    params = param_count(model)
    plan = SpikingPruner(model, images, pruning_ratio=0.5).step()
    assert plan and param_count(model) < 0.5 * params and all_on(model, device)
    assert torch.isfinite(fresh_forward(model, images.to(device))).all()


@pytest.mark.parametrize("device", DEVICES)
def test_ledger_prediction_equals_the_measured_footprint_on_a_device(device, images):
    model = on_device("spikformer", device).eval()
    graph = SpikingGraph(model, images)
    groups = graph.groups()
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    plan = {g.name: g.select(importance(g.importance_group), g.removable(0.4)) for g in groups}
    masks, ledger = Masks(), LedgerState(model, graph.state_bytes, layer_outputs(model, images))
    assert {alive.device.type for alive in ledger.alive.values()} == {device}
    for g in groups:
        ops = g.channel_ops(plan[g.name])
        masks.trial(ops)
        masks.commit()
        for op in ops:
            ledger.remove(op)
    x = images.to(device)
    masked, predicted = fresh_forward(model, x), ledger.footprint()
    masks.clear()
    apply_plan(graph, plan, groups)
    assert predicted == footprint(model, images) and predicted.param_bytes < footprint(build("spikformer"), images).param_bytes
    torch.testing.assert_close(fresh_forward(model, x), masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_and_export_on_a_device(device, digits, tmp_path):
    model = digits_model().to(device)
    teacher = frozen_copy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = digits.loader("train", 64, shuffle=True, limit=128)  # batches on the CPU: train moves them
    losses = train(model, loader, 1, lr=1e-2, progress=False, amp=True,
                   distill=Distillation(teacher, weight=0.5, temperature=4.0))
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert all_on(model, device) and all_on(teacher, device)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert 0.0 <= accuracy(model, digits.loader("val", 128)) <= 1.0
    x = torch.from_numpy(digits.x_val[:8])
    on_cpu = logits(copy.deepcopy(model).cpu().eval(), x)  # the CPU's arithmetic: what the export computes
    files = to_torchscript(model, x, tmp_path / "model")  # verified against the model on the 8 images
    assert model_device(model).type == device and files[0].is_file()  # exported from a CPU copy
    loaded = torch.jit.load(str(files[0]), map_location="cpu")
    assert torch.equal(loaded(x).mean(0).argmax(1), on_cpu.argmax(1))
