"""Configuration: GPT-NeoX YAML files -> one typed, validated `NeoXConfig` (neox_config), the values each
key may take and the whole-config checks (rules), upstream's other keys (upstream), the dtype map
(dtypes), and docs/config.md generated from them (doc).
"""
