"""vaediag inside other training frameworks (each an optional extra): :mod:`.lightning`."""
