"""The conversion CLIs' exit-code convention (convert/cli.run_cli): a checkpoint that cannot be
written or read (CheckpointError, e.g. a disk full mid-save) is one ``error:`` line and exit 2,
like any bad input; a failed verification exits 1."""

import errno

from megatron_longpo.checkpoint.model_io import CheckpointSaveError
from megatron_longpo.convert import ConversionError, VerificationError
from megatron_longpo.convert.cli import run_cli


def _raises(exc):
    def convert():
        raise exc
    return convert


def test_errors_are_one_line_with_the_exit_code(capsys):
    cases = [(CheckpointSaveError(errno.ENOSPC, "/ckpt/iter_0000001.tmp: no space left on device"), 2),
             (ConversionError("config.json: unsupported field"), 2), (VerificationError("logits differ"), 1)]
    for exc, code in cases:
        assert run_cli(_raises(exc), str) == code
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert run_cli(lambda: 7, lambda r: f"done {r}") == 0
    assert capsys.readouterr().out == "done 7\n"
