import type { Command } from 'commander';

/** `parley user add|list` (to be completed). */
export function registerUser(_program: Command): void {}
