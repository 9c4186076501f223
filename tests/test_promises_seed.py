"""Seed validators: a rejected value is named, and the hint says what a valid one looks like."""

from __future__ import annotations

import pytest
from test_seed import make_spec

from qemu_instances import seed
from qemu_instances.errors import UsageError


@pytest.mark.parametrize(
    ("validate", "value", "message", "hint"),
    [
        (seed.validate_hostname, "-web", "invalid host name '-web'", "use 1 to 63 letters, digits and '-'"),
        (seed.validate_user, "root", "invalid user name 'root'", "starting with a letter; not root"),
        (seed.validate_instance_id, "i 1", "invalid instance id 'i 1'", "use up to 128 letters, digits, '.', '_'"),
    ],
)
def test_a_rejected_value_is_named_with_a_hint(validate: object, value: str, message: str, hint: str) -> None:
    with pytest.raises(UsageError, match=message) as err:
        validate(value)  # type: ignore[operator]
    assert err.value.hint is not None and hint in err.value.hint


def test_a_bad_key_in_a_seed_is_called_an_ssh_key() -> None:
    with pytest.raises(UsageError, match=r"^SSH key: unsupported or unknown SSH key type 'ssh-dss'"):
        make_spec(ssh_keys=("ssh-dss AAAAB3NzaC1kc3MAAACBAP",))
