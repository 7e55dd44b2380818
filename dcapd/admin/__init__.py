"""``dcapd-admin``: the air-gapped operator's tool, interoperable with Intel's PccsAdminTool.

Subcommands (pccs-reference.md §4.2-§4.4, Appendix A):

* ``get``      GET /platforms from a PCCS -> ``platform_list.json``
* ``collect``  PCK ID retrieval tool CSV files -> ``platform_list.json``
* ``fetch``    every platform's collateral from Intel PCS -> ``platform_collaterals.json``
  (Intel's upload format), plus ``not_available.json``; resumable, retried with backoff
* ``put``      PUT the collateral file (or an appraisal policy) to a PCCS
* ``refresh``  ask a PCCS to refresh its collateral or certificates (and, against dcapd,
  list what changed)
* ``status``   dcapd's ``/dcapd/status`` as a table (or its JSON)
* ``hash-token`` the SHA-512 of a token, for dcapd's token settings
* ``import``   apply an upload file to a dcapd cache directory, no server needed
* ``export``   dump a dcapd cache directory as an upload file (``import`` restores it exactly)
* ``entries``, ``delete-entry``  list a cache directory's keys, delete one
* ``migrate``  import Intel PCCS's database (pckcache.db) into a dcapd cache

Files are interchangeable with Intel's tool. Keys Intel's tools do not know (they ignore
unknown keys) carry what Intel's format cannot express, so ``export`` then ``import`` gives
byte-identical answers: ``<name>_raw`` beside a parsed TCB info (its exact original text),
``dcapd_extra_uploads`` (further upload bodies, e.g. v3 collateral or items with a different
issuer chain, applied in order), ``dcapd_crls`` (``crl?uri=`` entries by URI, DER as hex) and
``dcapd_entries`` (registration-queue rows and appraisal policies, copied verbatim).

The package, one job per module: ``cli`` (options, logging, ``main``) and ``commands`` (one
``cmd_*`` per subcommand); ``common`` (the error, files, configuration, progress bar);
``platform_list`` (platform list files, CSV collection); ``pccs`` (talking to a PCCS);
``server_status`` (dcapd's status view, for ``status`` and ``refresh``);
``pcs`` (talking to Intel PCS: the resume journal, retries) and ``fetch`` (what ``fetch``
asks for); ``upload_file`` (Intel's upload format, its expired items), ``cache_import``
(and the check ``put`` makes), ``cache_export`` and ``cache_entries``;
``migrate`` (Intel's database into a dcapd cache) with ``migrate_read`` (reading Intel's
tables), ``migrate_rows`` (their values), ``migrate_collateral`` and ``migrate_platforms``.
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
