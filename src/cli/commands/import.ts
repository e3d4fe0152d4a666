import type { Command } from 'commander';

/** `parley import` (to be completed). */
export function registerImport(_program: Command): void {}
