"""Recipes on top of the hazmat layers (vault.he, vault.keys) that every operation shares."""
