"""Many workstations from one repository: the inventory (fleet.toml) and each host's spec."""
