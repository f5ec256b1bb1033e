"""Exception types shared by the package: bad user input vs internal failure."""


class FintwinInputError(ValueError):
    """Bad input from a user (data, config, arguments): the CLI exits 2 with the message."""
