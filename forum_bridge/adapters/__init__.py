"""PBX adapters: each turns one PBX's wire protocol into the bridge's normalised events."""
