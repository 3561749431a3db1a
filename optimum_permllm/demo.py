"""`python -m optimum_permllm.demo`, the README's main job: the demo itself is optimum_permllm/commands/demo.py."""

if __name__ == "__main__":
    from .commands.demo import main

    main()
