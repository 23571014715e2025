"""The openIMIS modules (Django apps) this test backend loads, in dependency order.

Override with the env var OPENIMIS_MODULES (comma-separated) if a module misbehaves.
"""
import os

DEFAULT_MODULES = [
    "core", "report", "location", "medical", "medical_pricelist", "product", "insuree",
    "policy", "contribution", "payer", "payment", "claim", "claim_batch", "claim_sampling",
    "tools", "calculation", "contribution_plan", "policyholder", "contract", "invoice",
    "calcrule_capitation_payment", "calcrule_commission", "calcrule_contribution_income_percentage",
    "calcrule_contribution_legacy", "calcrule_fees", "calcrule_third_party_payment",
    "calcrule_unconditional_cash_payment", "calcrule_social_protection", "calcrule_validations",
    "individual", "workflow", "tasks_management", "social_protection", "payment_cycle", "payroll",
    "grievance_social_protection", "deduplication", "controls", "im_export", "dhis2_etl",
    "api_etl", "opensearch_reports", "api_fhir_r4",
]


def openimis_apps():
    raw = os.environ.get("OPENIMIS_MODULES", "").strip()
    if raw:
        return [m.strip() for m in raw.split(",") if m.strip()]
    return list(DEFAULT_MODULES)


def get_locale_folders():
    return []
