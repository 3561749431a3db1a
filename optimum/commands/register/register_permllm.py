"""Registers `optimum-cli permllm ...`, the same sub-commands as the `permllm` console script.

optimum-cli imports every module of the `optimum.commands.register` namespace package (no __init__.py
on this path, PEP 420) and registers the commands listed in its REGISTER_COMMANDS. This module stays
light: optimum_permllm is imported only when `optimum-cli permllm` is parsed or run.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class PermLLMCommand(BaseOptimumCLICommand):
    """`optimum-cli permllm {prune,eval,export-dense,info,push,demo}`."""

    COMMAND = CommandInfo(name="permllm", help="N:M (2:4) sparsity with channel permutations (optimum-permllm)")

    @staticmethod
    def parse_args(parser):
        from optimum_permllm.commands.cli import add_subcommands

        add_subcommands(parser)

    def run(self):
        from optimum_permllm.commands.cli import dispatch

        status = dispatch(self.args, self.parser)
        if status:
            raise SystemExit(status)


REGISTER_COMMANDS = [PermLLMCommand]
