// Stands in for optional image/web packages the tokenizer never uses (pack.sh aliases them here).
export default {}
