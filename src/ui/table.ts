import Table from 'cli-table3'

/** A plain table: no colour codes, so piped and logged output stays clean text. */
export function createTable(head: string[]): Table.Table {
  return new Table({head, style: {head: [], border: []}})
}
