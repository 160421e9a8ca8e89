"""``atp-repro bench`` argument errors name the argument; config validation names the field."""

from __future__ import annotations

import pytest

from atp_repro.cli import main
from atp_repro.efficiency.strategies import BenchConfig, BenchConfigError


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--fast-backend", "flash9"], "--fast-backend"),
        (["--fixed-keep", "100", "50", "20", "10"], "--fixed-keep"),
        (["--fixed-keep", "100", "-5", "2"], "--fixed-keep"),
        (["--average-tokens", "88"], "--average-tokens"),
        (["--strategies", "ub_eager", "warp"], "--strategies"),
        (["--repeats", "0"], "--repeats"),
        (["--preset", "huge"], "--preset"),
        (["--dtype", "int8"], "--dtype"),
        (["--generate", "-3"], "--generate"),
        (["--generate", "8", "--batch-sizes", "0"], "--batch-sizes"),
        (["--generate", "8", "--baseline", "fastv"], "--generate"),
        (["--tiles", "0"], "--tiles"),
        (["--batch-sizes", "2"], "--batch-sizes"),
        (["--tiles", "5", "--average-tokens", "100"], "--average-tokens"),
    ],
)
def test_bad_arguments_fail_naming_the_argument(argv, flag, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert flag in err, err


def test_config_errors_name_the_field_and_the_allowed_values():
    with pytest.raises(BenchConfigError, match=r"fixed_keep=\(1, 2\).*3 values") as info:
        BenchConfig(fixed_keep=(1, 2))
    assert info.value.field == "fixed_keep"
    with pytest.raises(BenchConfigError, match=r"fast_backend='x'.*'sdpa'"):
        BenchConfig(fast_backend="x")
