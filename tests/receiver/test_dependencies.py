"""The receiver kit needs the standard library and ``cryptography`` (for the handoff) only."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.processes import rotator_env

# cryptography, and the extension modules it loads itself.
ALLOWED = {"receiver", "cryptography", "_cffi_backend", "_openssl"}

IMPORT_THE_KIT = """
import json, sys
before = set(sys.modules)
import receiver, receiver.handoff, receiver.server, receiver.signing, receiver.verify
loaded = {name.split(".")[0] for name in set(sys.modules) - before}
print(json.dumps(sorted(name for name in loaded if name not in sys.stdlib_module_names)))
"""


def test_the_receiver_kit_imports_only_the_standard_library_and_cryptography():
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_THE_KIT],
        env=rotator_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    outside = set(json.loads(done.stdout))
    assert "cryptography" in outside, "the handoff decrypts with cryptography"
    assert outside <= ALLOWED, outside - ALLOWED
