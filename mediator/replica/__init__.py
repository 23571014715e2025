"""Master-data replica: a copy of openIMIS's master data, synced from a read replica, served locally.

policy.py (schema of policies/replica.yaml), store.py (memory and Redis stores), records.py (what is
stored), sync.py (full and incremental pulls), serve.py (FHIR reads and searches), service.py (lifetime).
Nothing is imported here so that mediator.config can import the policy without cycles.
"""
