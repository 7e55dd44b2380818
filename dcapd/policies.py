"""Appraisal policies (pccs-reference.md §4.4): uploaded by the admin, one default per FMSPC;
GET /appraisalpolicy returns the FMSPC's default policies joined with ','."""

from __future__ import annotations

import base64
import binascii
import hashlib
import time

from . import jsonlimits
from .errors import PccsError
from .hexstr import is_hex
from .store import Entry, Store

# Intel's class_id -> policy type; the TD QE class is skipped (§4.4).
CLASS_TYPES = {
    "3123ec35-8d38-4ea5-87a5-d6c48b567570": 0,  # SGX
    "9eec018b-7481-4b1c-8e1a-9f7c0c8c777f": 1,  # TDX 1.0
    "f708b97f-0fb2-4e6b-8b03-8a5bcd1221d3": 2,
}  # TDX 1.5
TD_QE_CLASS = "3769258c-75e6-4bc7-8d72-d2b0e224cad2"


def _bad(reason: str) -> PccsError:
    return PccsError(400, f"appraisal policy: {reason}")


def policy_type(policy: str) -> int:
    """The type of the first known class_id in the JWT payload's policy_array."""
    segments = policy.split(".")
    if len(segments) < 2:  # Intel: 500 here ([ref-bug])
        raise _bad("not a JWT")
    payload_b64 = segments[1] + "=" * (-len(segments[1]) % 4)
    try:
        payload = jsonlimits.loads(base64.urlsafe_b64decode(payload_b64))
        inner = jsonlimits.loads(payload["policy_payload"])
        array = inner["policy_array"]
    except (ValueError, binascii.Error, KeyError, TypeError):
        raise _bad("payload has no policy_payload JSON with a policy_array") from None
    if not isinstance(array, list):
        raise _bad("policy_array is not a list")
    found = None
    for item in array:
        try:
            class_id = item["environment"]["class_id"].lower()
        except (KeyError, TypeError, AttributeError):
            raise _bad("a policy has no environment.class_id") from None
        if class_id == TD_QE_CLASS:
            continue
        if class_id not in CLASS_TYPES:
            raise _bad(f"unknown class_id {class_id}")
        if found is None:
            found = CLASS_TYPES[class_id]
    if found is None:
        raise _bad("no SGX or TDX class_id")
    return found


class Policies:
    def __init__(self, store: Store):
        self.store = store

    def defaults_for(self, fmspc: str) -> Entry:
        """The answer to GET appraisalpolicy: the FMSPC's default policies, comma-joined."""
        entry = self.store.get(self.store.appraisal_key(fmspc))
        if entry is None:
            raise PccsError(404, f"no default appraisal policy for FMSPC {fmspc}")
        return entry

    def put(self, body) -> str:
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("policy"), str)
            or not isinstance(body.get("is_default"), bool)
            or not isinstance(body.get("fmspc"), str)
            or not is_hex(body["fmspc"], (12,))
        ):
            raise _bad("body needs policy (string), is_default (boolean), fmspc (12 hex)")
        policy, fmspc, is_default = body["policy"], body["fmspc"].upper(), body["is_default"]
        kind = policy_type(policy)
        policy_id = hashlib.sha384(policy.encode("utf-8")).hexdigest()
        now = time.time()
        with self.store.transaction():
            key = self.store.policy_key(fmspc, policy_id)
            old = self.store.get_json(key)
            records = {
                k: self.store.get_json(k) for k in self.store.keys(self.store.policy_prefix(fmspc))
            }
            if is_default:  # a new default un-defaults the others of its FMSPC
                for other_key, record in records.items():
                    if record["is_default"] and other_key != key:
                        record["is_default"] = False
                        self.store.put_json(other_key, record)
            records[key] = {
                "id": policy_id,
                "type": kind,
                "policy": policy,
                "is_default": is_default,
                "fmspc": fmspc,
                "created_time": old["created_time"] if old else now,
                "updated_time": now,
            }
            self.store.put_json(key, records[key])
            defaults = [r["policy"] for r in records.values() if r["is_default"]]
            appraisal_key = self.store.appraisal_key(fmspc)
            if defaults:
                self.store.put(
                    appraisal_key,
                    Entry(",".join(defaults).encode("utf-8"), {}, "text/plain; charset=utf-8"),
                )
            else:
                self.store.delete(appraisal_key)
        return policy_id
