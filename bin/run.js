#!/usr/bin/env node
import {main} from '../dist/src/main.js'

// Not awaited: a closed pipe (`parscale --help | head`) leaves oclif's flush waiting for
// ever, and an awaited promise that never settles would end the process with code 13.
void main(import.meta.url)
