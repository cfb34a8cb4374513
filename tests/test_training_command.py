"""The command-line frame the training commands share (genalign.trainers.command)."""

import pytest

from genalign.trainers import flow_dpo, latent_reward, reward
from genalign.trainers.command import parse_training_args, recipe_arg, run_training, training_parser
from genalign.world import clip_pretrain, video_caption_pretrain


@pytest.mark.parametrize("main, prog", [
    (flow_dpo.main, "genalign train flow-dpo"),
    (latent_reward.main, "genalign train latent-reward"),
    (reward.main, "genalign train reward"),
    (clip_pretrain.main, "python -m genalign.world.clip_pretrain"),
    (video_caption_pretrain.main, "python -m genalign.world.video_caption_pretrain"),
])
def test_an_unknown_config_key_is_one_line_naming_the_command_and_the_key(main, prog, capsys):
    argv = ["--config", "flow_dpo_world"] if main is flow_dpo.main else []
    argv += ["--kind", "pickscore"] if main is reward.main else []
    assert main([*argv, "no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error:") and "no_such_key" in err and "\n" not in err


def test_help_config_lists_the_keys_and_resume_becomes_an_override(capsys):
    assert flow_dpo.main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert "beta" in out and "sft_weight" in out
    parser = training_parser("p", "d", config_help="recipe")
    args, overrides = parse_training_args(parser, flow_dpo.FlowDPOConfig, ["--resume", "latest", "beta=5"])
    assert overrides == ["beta=5", "resume=latest"] and args.config is None


def test_other_errors_keep_their_traceback_and_recipes_resolve_by_name():
    def broken() -> int:
        raise ZeroDivisionError("a bug, not a user mistake")

    with pytest.raises(ZeroDivisionError):
        run_training("genalign train x", broken)
    assert recipe_arg("flow_dpo_world").endswith("flow_dpo_world.yaml")
    assert recipe_arg("no_such_recipe") == "no_such_recipe"  # load_config then names the missing file
    assert recipe_arg(None) is None


def test_train_and_report_prints_the_model_and_the_evaluation(tmp_path, capsys):
    from types import SimpleNamespace

    from genalign.trainers.command import train_and_report

    class Trained:  # what train_and_report reads of a trainer after train()
        eval_result = None

        def train(self):
            return SimpleNamespace(step=7, final_model_dir=tmp_path / "model", output_dir=tmp_path)

    trainer = Trained()
    assert train_and_report(trainer, "reward model", str) == 0
    assert capsys.readouterr().out == f"done: step 7, reward model at {tmp_path / 'model'}\n"
    trainer.eval_result = {"TA": 0.6}
    train_and_report(trainer, "latent reward model", lambda r: f"table {r['TA']}", "latent_reward_eval.json")
    assert capsys.readouterr().out.splitlines()[1:] == ["table 0.6",
                                                        f"evaluation: {tmp_path / 'eval' / 'latent_reward_eval.json'}"]
