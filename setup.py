"""Everything is in pyproject.toml except one file that its tables cannot place: a .pth file at site-packages' root.

`optimum_permllm-autoload.pth` lets transformers load permllm checkpoints without `import optimum_permllm`
(see `_optimum_permllm_autoload.py`). A wheel gets it from build_py; an editable wheel is assembled from an
install folder that build_py does not write to, so there the file is copied into that folder.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "optimum_permllm-autoload.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, str(Path(target, PTH)), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, str(Path(self.build_lib, PTH))]


setup(cmdclass={"build_py": build_py_with_pth})
