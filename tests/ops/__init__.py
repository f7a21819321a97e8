"""Operations tests: scripts, README commands, compose and Docker files."""
