import Table from 'cli-table3'

/** A plain table: no colour codes, so piped and logged output stays clean text. */
export function createTable(head: string[]): Table.Table {
  return new Table({head, style: {head: [], border: []}})
}

/** Left-aligned columns under a header, as `ls -l` or `docker ps` print them: easy to grep and cut. */
export function columns(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)))
  const line = (cells: string[]): string =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i])))
      .join('  ')
      .trimEnd()
  return [line(header), ...rows.map(line)].join('\n')
}
