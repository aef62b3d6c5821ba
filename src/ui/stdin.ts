/** All of stdin as text, for a piped prompt. */
export async function readStdin(): Promise<string> {
  const chunks: Buffer[] = []
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer)
  // `echo prompt |` adds one newline that is not part of the prompt
  return Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '')
}
