"""Errors that mean "the input is wrong": the CLI prints their message (which names the
thing and the fix) without a traceback. Everything else is a bug and keeps its traceback."""


class UserError(Exception):
    pass
