"""The soak's parts (hack/soak.py composes them): `config` (what a run is told), `site` (its
bucket, topics and subscriptions on the stand-ins), `workload` (what is published), `ledger`
(what was published and what came back), `supervisor` (the KEDA-like pool of drain workers),
`faults` (the seeded plan and how each fault is applied) and `verdict` (the outcome, read from
storage and the results topic only; `sets` checks one track's stored set).
"""
