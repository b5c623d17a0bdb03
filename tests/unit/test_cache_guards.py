"""Semantic-cache guards: paraphrases pass, close-but-different questions are refused."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from services.cache import guards
from services.cache.guards import GUARDS, Rejection, check, normalize

# --------------------------------------------------------------------------------------------
# Should pass: paraphrases, reorderings, case/punctuation changes, synonyms, typos.
# --------------------------------------------------------------------------------------------

PASS = [
    ("How do I reset my password?", "how can I reset my password"),
    ("How do I reset my password?", "password reset steps?"),
    ("How do I reset my password?", "How do I reset my pasword?"),
    ("Where is my order?", "Can you tell me where my parcel is?"),
    ("What are your opening hours?", "When are you open?"),
    ("How much does delivery cost?", "What are your delivery charges?"),
    ("Can I return an item I bought online?", "Can I return something I bought online?"),
    ("How do I change my delivery address?", "How can I update the delivery address?"),
    ("Do you deliver on Sundays?", "Do you deliver on a Sunday?"),
    ("Is there a fee for paying by card?", "Do you charge a fee for card payments?"),
    ("How long does a refund take?", "How many days until I get my refund?"),
    ("Can I pay in instalments?", "Is it possible to pay in installments?"),
    ("How do I turn off notifications?", "How can I switch off notifications?"),
    ("How do I delete my account?", "How can I remove my account?"),
    ("How do I cancel my subscription?", "I'd like to end my subscription, how do I do that?"),
    ("WHERE IS MY ORDER", "where is my order?"),
    ("In the UK, what's the drinking age?", "What's the drinking age in the UK?"),
    ("What's the drinking age in the UK?", "what is the drinking age in the uk"),
    ("What's the drinking age in the UK?", "What's the legal drinking age in Britain?"),
    ("Can I get a refund after 14 days?", "Can I get a refund after two weeks?"),
    ("Book a table for 2 at 7pm", "Book a table for two at 7 pm"),
    ("Book a table for 2 at 7pm", "Could I book a table for two at seven this evening?"),
    ("Can I get a 12-month contract?", "Can I get a one-year contract?"),
    ("Is the museum open on Christmas Day?", "Is the museum open on Xmas day?"),
    ("How do I install Python on Windows?", "How do I install Python on my Windows laptop?"),
    ("How do I get to London from Manchester?", "How do I travel from Manchester to London?"),
    ("Is Python faster than Java?", "Is Python quicker than Java?"),
    (
        "Write a function to reverse a list in Python",
        "Write a Python function that reverses a list",
    ),
    ("Summarise this in three bullet points", "Give me a 3 bullet point summary of this"),
    ("How do I lock my card?", "How can I freeze my card?"),
    ("What's the weather like in Paris today?", "What's the weather in Paris?"),
    ("Can I bring my dog on the train?", "Are dogs allowed on trains?"),
    ("How do I contact customer service?", "How can I get in touch with customer support?"),
    ("How can I check my balance?", "How do I see my account balance?"),
    ("My card was declined, why?", "Why was my card declined?"),
    ("Which one should I choose?", "Which should I choose?"),
    ("What should I do first?", "What should I do?"),
    ("Do I need a visa for Japan or not?", "Do I need a visa for Japan?"),
    ("How much is the fee in £?", "How much is the fee in pounds?"),
    ("Convert 100 USD to GBP", "Convert 100 dollars to pounds"),
    ("How do I log in to the app?", "How do I sign in to the app?"),
    ("I'm not sure how to change my PIN", "How do I change my PIN?"),
    ("How do I fill in the claim form?", "How do I fill out the claim form?"),
    ("Can I get 10% off my first order?", "Is there a 10% discount on a first order?"),
    ("What's the price for members?", "How much do members pay?"),
    ("What's the price for non-members?", "How much does it cost if I'm not a member?"),
    ("Is parking free on weekends?", "Is parking free at the weekend?"),
    ("What time does the last train to Leeds leave?", "When does the final train to Leeds go?"),
    ("How do I add a user to the team?", "How can I invite a new team member?"),
    ("Can I pay my bill with PayPal?", "Do you accept PayPal for bills?"),
    ("What's the capital of France?", "what's the capital of france"),
    ("Tell me about the Eiffel Tower", "Tell me about the eiffel tower"),
    ("How do I upgrade my plan?", "How can I upgrade my plan?"),
    ("How do I set up direct debit?", "How can I set up a direct debit?"),
    ("Which plan is less expensive?", "Which plan is cheaper?"),
    ("Where is my parcel?", "Where is my package?"),
    ("Can I keep a cat in my flat?", "Can I keep a cat in my apartment?"),
    ("What's the price of a day pass?", "What's the cost of a day pass?"),
    ("Can I return an item I bought online?", "Can I return something I bought online?"),
    ("How do I lock my card?", "How do I lock my crad?"),
    ("How do I change my name?", "How do I change my nmae?"),
    ("How do I claim expenses?", "How do I submit expenses?"),
    ("I can't remember my password", "I forgot my password"),
    ("Which items are not allowed?", "Which items are banned?"),
    ("Is it not possible to pay by card?", "Is it impossible to pay by card?"),
]

# --------------------------------------------------------------------------------------------
# Must be refused, per guard.  (guard, a, b)
# --------------------------------------------------------------------------------------------

TRAPS = [
    # numbers, dates, times, money, versions, ids
    ("numbers", "Track order 48213", "Track order 48231"),
    ("numbers", "Book a table for 2", "Book a table for 4"),
    ("numbers", "Book a table for two", "Book a table for four"),
    ("numbers", "Can I come at 3pm?", "Can I come at 3am?"),
    ("numbers", "Is Python 3.11 supported?", "Is Python 3.12 supported?"),
    ("numbers", "Is Python 3.1 supported?", "Is Python 3.10 supported?"),
    ("numbers", "Free delivery over £50?", "Free delivery over £500?"),
    ("numbers", "Is there a 5% discount?", "Is there a 15% discount?"),
    ("numbers", "Delivery in 2 days?", "Delivery in 2 weeks?"),
    ("numbers", "Are you open on Saturday?", "Are you open on Sunday?"),
    ("numbers", "Are you open on Saturday?", "Are you open on Saturday morning?"),
    ("numbers", "Is 5th May a bank holiday?", "Is 6th May a bank holiday?"),
    ("numbers", "Order #1234 status", "Order #1243 status"),
    ("numbers", "Can I book for 12/05/2024?", "Can I book for 05/12/2024?"),
    ("numbers", "Price for three nights?", "Price for four nights?"),
    ("numbers", "Does the iPhone 14 support eSIM?", "Does the iPhone 15 support eSIM?"),
    ("numbers", "Is my first car insured?", "Is my second car insured?"),
    ("numbers", "What's the dose for a 6-year-old?", "What's the dose for a 16-year-old?"),
    ("numbers", "Is the shop open in March?", "Is the shop open in April?"),
    ("numbers", "Is the annual fee refundable?", "Is the monthly fee refundable?"),
    ("numbers", "Can I book an appointment tomorrow?", "Can I book an appointment on Friday?"),
    ("numbers", "\uff34rack order \uff14\uff18\uff12\uff11\uff13", "Track order 48231"),
    # negation
    ("negation", "Cancel my subscription", "Don't cancel my subscription"),
    ("negation", "What happens if I pay on time?", "What happens if I don't pay on time?"),
    ("negation", "Can I travel with a passport?", "Can I travel without a passport?"),
    ("negation", "Should I water cacti in winter?", "Should I stop watering cacti in winter?"),
    ("negation", "Which foods should I eat?", "Which foods should I avoid?"),
    ("negation", "Why did my payment go through?", "Why did my payment fail to go through?"),
    ("negation", "I can log in", "I cannot log in"),
    ("negation", "Is the museum ever free?", "Is the museum never free?"),
    ("negation", "Do members get a discount?", "Do non-members get a discount?"),
    ("negation", "Is my phone covered?", "Is my phone not covered?"),
    ("negation", "What can I recycle?", "What can't I recycle?"),
    ("negation", "Who has access to the file?", "Who has no access to the file?"),
    # antonyms (lexicon, particles, morphology, direction)
    ("antonyms", "How do I lock my card?", "How do I unlock my card?"),
    ("antonyms", "What are the benefits of leasing?", "What are the drawbacks of leasing?"),
    ("antonyms", "How do I turn on two-factor login?", "How do I turn off two-factor login?"),
    ("antonyms", "How do I turn the heating on?", "How do I turn the heating off?"),
    ("antonyms", "How do I upload photos?", "How do I download photos?"),
    ("antonyms", "Can I cancel before the deadline?", "Can I cancel after the deadline?"),
    ("antonyms", "Can I cancel within 14 days?", "Can I cancel after 14 days?"),
    ("antonyms", "Is the pool inside?", "Is the pool outside?"),
    ("antonyms", "Is it above freezing?", "Is it below freezing?"),
    ("antonyms", "Arguments for nuclear power", "Arguments against nuclear power"),
    ("antonyms", "How do I increase my limit?", "How do I decrease my limit?"),
    ("antonyms", "How do I buy shares?", "How do I sell shares?"),
    ("antonyms", "What is the cheapest plan?", "What is the most expensive plan?"),
    ("antonyms", "Which is the cheapest plan?", "Which is the priciest plan?"),
    ("antonyms", "Is the repository public?", "Is the repository private?"),
    ("antonyms", "How do I log in?", "How do I log out?"),
    (
        "antonyms",
        "How do I subscribe to the newsletter?",
        "How do I unsubscribe from the newsletter?",
    ),
    ("antonyms", "Why is my ticket valid?", "Why is my ticket invalid?"),
    ("antonyms", "Which socket is the input?", "Which socket is the output?"),
    ("antonyms", "Was I overcharged?", "Was I undercharged?"),
    ("antonyms", "Where are arrivals?", "Where are departures?"),
    ("antonyms", "How do I enable cookies?", "How do I disable cookies?"),
    ("antonyms", "Is breakfast included?", "Is breakfast excluded?"),
    ("antonyms", "Transfer £50 from savings to current", "Transfer £50 from current to savings"),
    ("antonyms", "Convert a Word file to PDF", "Convert a PDF to a Word file"),
    ("antonyms", "Is tea healthier than coffee?", "Is coffee healthier than tea?"),
    ("antonyms", "Who is the landlord's agent?", "Who is the tenant's agent?"),
    ("antonyms", "What's the earliest check-in time?", "What's the latest check-in time?"),
    ("antonyms", "Why is my connection so fast?", "Why is my connection so slow?"),
    ("antonyms", "Which plan is less expensive?", "Which plan is more expensive?"),
    ("antonyms", "When is the gym least busy?", "When is the gym busiest?"),
    ("antonyms", "Are dogs allowed?", "Are dogs banned?"),
    ("antonyms", "Is the café open?", "Is the café closed?"),
    # persons / possessors
    ("persons", "How do I reset my password?", "How do I reset my colleague's password?"),
    ("persons", "How do I reset my password?", "How do I reset his password?"),
    ("persons", "Can I see my medical records?", "Can I see my son's medical records?"),
    ("persons", "Can I use my card abroad?", "Can I use someone else's card abroad?"),
    ("persons", "Can I open a savings account?", "Can I open a savings account for my daughter?"),
    ("persons", "How do I switch supplier as a tenant?", "How do I switch supplier?"),
    # entities / places / currencies
    ("entities", "Who is the CEO of Tesla?", "Who is the CEO of Netflix?"),
    ("entities", "What's the drinking age in the UK?", "What's the drinking age in the US?"),
    (
        "entities",
        "How do I export contacts from Mailchimp?",
        "How do I export contacts from Zendesk?",
    ),
    ("entities", "Train times from London to Leeds", "Train times from London to York"),
    ("entities", "Does Barclays charge for transfers?", "Does Santander charge for transfers?"),
    ("entities", "what's the vat rate in france", "what's the vat rate in spain"),
    ("entities", "Convert 100 USD to GBP", "Convert 100 USD to EUR"),
    # identifiers
    ("identifiers", "What does os.path.join do?", "What does os.path.split do?"),
    ("identifiers", "How do I parse config.yaml?", "How do I parse settings.yaml?"),
    ("identifiers", "What does the --force flag do?", "What does the --verbose flag do?"),
    ("identifiers", "Why is get_user slow?", "Why is get_users slow?"),
    ("identifiers", "Why is getUser slow?", "Why is getUsers slow?"),
    ("identifiers", "Email support@example.com", "Email sales@example.com"),
    ("identifiers", "Is https://example.com/a down?", "Is https://example.com/b down?"),
    ("identifiers", "Where is /etc/hosts?", "Where is /etc/passwd?"),
    ("identifiers", "What does `fetch()` return?", "What does `fetchAll()` return?"),
    # output format
    ("format", "List the planets in JSON", "List the planets as a table"),
    ("format", "Give me the data in JSON", "Give me the data in YAML"),
    ("format", "Reply as a bulleted list", "Reply as a numbered list"),
    ("format", "Explain inflation in one sentence", "Explain inflation in detail"),
    ("format", "Briefly explain inflation", "Explain inflation in depth"),
    ("format", "Explain inflation", "Explain inflation as a haiku"),
    ("format", "Describe the process as a flowchart", "Describe the process"),
    # language
    ("language", "Say good morning in French", "Say good morning in German"),
    ("language", "Write a web server in Python", "Write a web server in Rust"),
    ("language", "Sort a list using Go", "Sort a list using Java"),
    ("language", "Explica la fotosíntesis en español", "Explica la fotosíntesis en inglés"),
    ("language", "translate this into japanese", "translate this into korean"),
    # platforms
    (
        "platforms",
        "How do I back up my photos on iPhone?",
        "How do I back up my photos on Android?",
    ),
    ("platforms", "How do I install Node on Windows?", "How do I install Node on macOS?"),
    ("platforms", "How do I clear the cache in Chrome?", "How do I clear the cache in Firefox?"),
    # qualifiers
    ("qualifiers", "Return policy for online orders", "Return policy for in-store purchases"),
    ("qualifiers", "Do you have a vegan menu?", "Do you have a vegetarian menu?"),
    ("qualifiers", "Do you offer accounts for business?", "Do you offer accounts?"),
    ("qualifiers", "Is there a discount for kids?", "Is there a discount for seniors?"),
    # substitution: one noun swapped in an otherwise identical question
    ("substitution", "Does the hotel have a pool?", "Does the hotel have a sauna?"),
    ("substitution", "Can I bring my own wine?", "Can I bring my own cake?"),
    (
        "substitution",
        "What is the speed limit on a motorway?",
        "What is the speed limit on a bridge?",
    ),
    ("substitution", "Do I pay tax on my salary?", "Do I pay tax on my pension?"),
    ("substitution", "Is there a discount for nurses?", "Is there a discount for teachers?"),
]


# More everyday pairs: paraphrases that must pass, and different questions that must be refused
# (by whichever guard objects first).
MORE_PASS = [
    ("Why can't I log in?", "I'm unable to sign in, why?"),
    ("My card doesn't work abroad", "My card isn't working overseas"),
    (
        "What's the cheapest way to send money abroad?",
        "How can I send money overseas for the lowest cost?",
    ),
    ("Is it too late to cancel?", "Can I still cancel?"),
    ("How early can I check in?", "What's the earliest check-in time?"),
    ("Why was my payment rejected?", "Why did my payment fail?"),
    ("Do I have to pay for parking?", "Is parking free?"),
    ("Is the store open late on Thursdays?", "Do you have late opening on Thursday?"),
    ("How do I sign up for an account?", "How do I register for an account?"),
    ("How do I switch on Bluetooth?", "How do I enable Bluetooth?"),
    ("How do I get my deposit back?", "How do I reclaim my deposit?"),
    ("Should I book in advance?", "Do I need to book ahead?"),
    ("What's the best time to visit Japan?", "When is the best time to go to Japan?"),
    ("Can you recommend a good Italian restaurant?", "Any good Italian restaurants nearby?"),
    ("How do I log into my account?", "How can I access my account?"),
    ("I forgot my password", "I can't remember my password"),
    ("Which items are not allowed in hand luggage?", "Which items are banned from hand luggage?"),
    ("What's included in the price?", "What does the price include?"),
    ("How do I add a payee?", "How do I set up a new payee?"),
    ("Are there any hidden fees?", "Do you charge any extra fees?"),
    ("How far is Leeds from York?", "How far is York from Leeds?"),
    ("Is it possible to change my flight?", "Can I change my flight?"),
    ("Is it impossible to change my flight?", "Is it not possible to change my flight?"),
    ("How long is the warranty?", "What's the warranty period?"),
    ("How do I update my iPhone?", "How do I update iOS on my phone?"),
    ("How can I speak to a human?", "How do I talk to a real person?"),
    ("What do I do if my flight is delayed?", "My flight is delayed, what should I do?"),
    ("Can I get a receipt by email?", "Can you email me a receipt?"),
    ("How do I reset my router?", "How do I restart my router?"),
    ("What are the side effects of ibuprofen?", "Does ibuprofen have side effects?"),
    ("Do you price match?", "Will you match a competitor's price?"),
    ("How do I make a complaint?", "How can I complain?"),
    ("What is the deadline for self assessment?", "When is the self assessment deadline?"),
    ("How many calories are in a banana?", "How many calories does a banana have?"),
    ("Can I bring food into the stadium?", "Am I allowed to take food into the stadium?"),
    ("Is there wifi on the train?", "Does the train have wi-fi?"),
    ("What's the minimum deposit?", "What's the smallest deposit I can make?"),
    ("How do I find my account number?", "Where can I see my account number?"),
    ("Can I pay with Apple Pay?", "Do you accept Apple Pay?"),
    ("How do I print a boarding pass?", "How can I print my boarding pass?"),
    ("What happens if I miss a payment?", "What if I miss a payment?"),
    (
        "How do I know if my parcel was delivered?",
        "How can I tell whether my parcel has been delivered?",
    ),
    ("How do I open a joint account?", "Can I open a joint account?"),
    ("How do I get a new PIN?", "I need a new PIN, how do I get one?"),
    ("Is the gym open on bank holidays?", "Does the gym open on bank holidays?"),
    ("How do I download my bank statements?", "Where can I download bank statements?"),
    ("Is the tap water safe to drink?", "Can I drink the tap water?"),
    ("How do I change my name on my account?", "How do I update the name on my account?"),
    ("How do I close my account?", "I want to close my account"),
    (
        "How much does it cost to send a letter to France?",
        "What's the postage for a letter to France?",
    ),
    ("Can I upgrade my phone early?", "Is an early upgrade possible on my phone?"),
    ("How do I claim on my travel insurance?", "How can I make a travel insurance claim?"),
    ("How do I update my billing address?", "How can I change my billing address?"),
    ("What's the latest I can cancel without a fee?", "How late can I cancel for free?"),
    ("Can I get a refund if I change my mind?", "If I change my mind, will I get my money back?"),
    ("How long does standard delivery take?", "How many days is standard delivery?"),
    ("Do I need an appointment?", "Is an appointment necessary?"),
    ("Is there step-free access at the station?", "Does the station have step-free access?"),
    ("How do I report a lost card?", "I've lost my card, how do I report it?"),
    ("How do I add someone to my policy?", "Can I add another driver to my policy?"),
    ("When is my next bill due?", "When do I have to pay my next bill?"),
    ("How do I check my pension balance?", "How can I see how much is in my pension?"),
    ("Can I pay my rent by standing order?", "Is it possible to pay rent via standing order?"),
    ("What are the symptoms of COVID?", "What symptoms does COVID cause?"),
    ("How do I appeal a parking fine?", "How can I challenge a parking ticket?"),
    ("Where can I recycle batteries?", "Where do I take old batteries for recycling?"),
    ("What's your returns address?", "Where do I send returns?"),
    ("How do I renew my passport?", "How can I renew my passport online?"),
    ("Can I freeze my gym membership?", "Is it possible to pause my gym membership?"),
    (
        "How do I get a copy of my birth certificate?",
        "Where can I order a copy of my birth certificate?",
    ),
    ("Do you offer student discounts?", "Is there a student discount?"),
    ("Is the car park free after 6pm?", "Is parking free after 6 pm?"),
    ("What's the phone number for customer services?", "How do I call customer services?"),
    ("Can I change the date of my booking?", "How do I move my booking to another date?"),
    ("How much is a first class stamp?", "What does a 1st class stamp cost?"),
    ("Why is my internet so slow?", "Why is my broadband slow?"),
    ("How do I cancel my direct debit?", "How can I stop my direct debit?"),
    ("Do you have any rooms available tonight?", "Are any rooms free tonight?"),
    ("What time does check-in open?", "When does check-in start?"),
    ("How do I upgrade to premium?", "Can I upgrade my account to premium?"),
    ("What time do you close today?", "When do you shut today?"),
    ("When is the gym least busy?", "When is the gym quietest?"),
    ("How do I learn to code?", "How can I teach myself programming?"),
    ("When do I get paid?", "When will I receive my salary?"),
    ("Is there protection against fraud?", "Do you have fraud protection?"),
    ("How can I pay less for my energy?", "How can I reduce my energy bills?"),
    ("How do I turn on location services?", "How do I switch location services on?"),
    ("Where do I go to renew my licence?", "Where can I renew my licence?"),
    ("Is it cheaper to book online?", "Do I save money by booking online?"),
    ("What do I do if I lock myself out?", "I'm locked out, what should I do?"),
    ("How do I get out of my contract early?", "Can I end my contract early?"),
    (
        "Can I leave my bags at the hotel after check-out?",
        "Can you store my luggage after I check out?",
    ),
    ("How do I keep my account secure?", "How can I protect my account?"),
    ("What's the fastest way to get to the airport?", "What's the quickest route to the airport?"),
    ("Can I work from home?", "Am I allowed to work remotely?"),
    ("How much notice do I have to give?", "What notice period do I need to give?"),
    ("My parcel hasn't arrived", "I haven't received my parcel"),
    ("I didn't get a confirmation email", "I never received a confirmation email"),
    ("Is it safe to use public wifi?", "Is public Wi-Fi secure?"),
    (
        "Can I still use my ticket if my train is cancelled?",
        "If my train is cancelled is my ticket still valid?",
    ),
    ("What happens if I'm late for my appointment?", "What if I arrive late to my appointment?"),
    ("Which documents do I need to bring?", "What documents should I take with me?"),
    ("How do I start a claim?", "How do I begin a claim?"),
    ("Do you have anything cheaper?", "Is there a less expensive option?"),
    ("How long will my battery last?", "What's the battery life?"),
    ("Are pets allowed in the flat?", "Can I keep a pet in the flat?"),
    ("When does my contract end?", "When does my contract finish?"),
    ("Can I speak to a manager?", "I want to talk to a manager"),
    ("How do I sign out of all devices?", "How do I log out everywhere?"),
    ("What is your refund policy?", "How do refunds work?"),
    ("Can I collect my order from the store?", "Can I pick up my order in store?"),
    ("How do I top up my phone?", "How can I add credit to my phone?"),
    ("What should I do if I feel unwell after the vaccine?", "What if I feel ill after my jab?"),
    ("Is breakfast included in the price?", "Does the price include breakfast?"),
    ("How do I stop my card being used online?", "How do I block online payments on my card?"),
    ("I forgot my username", "I can't remember my username"),
    ("Why was I charged twice?", "Why have I been billed two times?"),
]

MORE_TRAPS = [
    ("How do I enable dark mode?", "How do I disable dark mode?"),
    ("Is it safe to drink tap water in Spain?", "Is it unsafe to drink tap water in Spain?"),
    ("What should I pack for a ski trip?", "What shouldn't I pack for a ski trip?"),
    ("Which medicines can I take while pregnant?", "Which medicines must I avoid while pregnant?"),
    ("How do I allow pop-ups in Chrome?", "How do I block pop-ups in Chrome?"),
    (
        "Can I claim expenses for working from home?",
        "Why can't I claim expenses for working from home?",
    ),
    ("How do I accept a friend request?", "How do I reject a friend request?"),
    ("How do I join a Teams meeting?", "How do I leave a Teams meeting?"),
    ("How do I mute my microphone?", "How do I unmute my microphone?"),
    ("How do I pause my membership?", "How do I resume my membership?"),
    ("What documents are required?", "What documents are optional?"),
    ("When does the sale start?", "When does the sale end?"),
    ("How do I connect my headphones?", "How do I disconnect my headphones?"),
    ("How do I approve a timesheet?", "How do I reject a timesheet?"),
    ("How do I raise my credit limit?", "How do I lower my credit limit?"),
    ("How do I follow someone on Instagram?", "How do I unfollow someone on Instagram?"),
    ("How do I start smoking less?", "How do I stop smoking?"),
    ("Are you able to help?", "Are you unable to help?"),
    ("How do I move from Spotify to Apple Music?", "How do I move from Apple Music to Spotify?"),
    ("Flights from Paris to Rome", "Flights from Rome to Paris"),
    ("Is Android better than iOS?", "Is iOS better than Android?"),
    (
        "How do I transfer contacts from iPhone to Android?",
        "How do I transfer contacts from Android to iPhone?",
    ),
    ("Who founded Tesla?", "Who founded SpaceX?"),
    ("What's the population of Canada?", "What's the population of Australia?"),
    ("Translate hello from English to Spanish", "Translate hello from Spanish to English"),
    ("Does Tesco sell gift cards?", "Does Sainsbury's sell gift cards?"),
    ("Is the office open on bank holidays?", "Is the office open on weekends?"),
    ("What's the weather forecast for tomorrow?", "What's the weather forecast for the weekend?"),
    ("Can I park here after 6pm?", "Can I park here after 8pm?"),
    ("How much is a 2-bedroom flat?", "How much is a 3-bedroom flat?"),
    ("What's the rate on a 2-year fix?", "What's the rate on a 5-year fix?"),
    ("Do you deliver before noon?", "Do you deliver before midnight?"),
    ("Is the pool open in summer?", "Is the pool open in winter?"),
    ("Who won the 2018 World Cup?", "Who won the 2022 World Cup?"),
    ("What's the price for a double room?", "What's the price for a single room?"),
    ("How do I reset my own PIN?", "How do I reset my child's PIN?"),
    ("What's the minimum wage for over-21s?", "What's the minimum wage for under-18s?"),
    ("Is the discount for students?", "Is the discount for teachers?"),
    ("How do I apply for a UK passport?", "How do I apply for a US passport?"),
    ("Is there a lift to the first floor?", "Is there a lift to the second floor?"),
    ("Where is the nearest ATM?", "Where is the farthest ATM?"),
    ("What's the check-in time?", "What's the check-out time?"),
    ("What time do you open?", "What time do you close?"),
    ("How do I import contacts?", "How do I export contacts?"),
    ("Is the heating included in the rent?", "Is the heating excluded from the rent?"),
    ("Do you ship to Canada?", "Do you ship to Mexico?"),
    ("What's the capital of Austria?", "What's the capital of Australia?"),
    ("How do I convert Celsius to Fahrenheit?", "How do I convert Fahrenheit to Celsius?"),
    ("Can I use my phone in Spain?", "Can I use my phone in Portugal?"),
    ("Can I pay by cash?", "Can I pay by card?"),
    ("How do I print in colour?", "How do I print in black and white?"),
    ("What is the upper limit?", "What is the lower limit?"),
    ("Can I bring my partner?", "Can I bring my children?"),
    ("Do I pay tax on my salary?", "Do I pay tax on my pension?"),
    ("How do I reset my password on Android?", "How do I reset my password on iPhone?"),
    ("Explain recursion in Python", "Explain recursion in JavaScript"),
    ("Give me the answer in a table", "Give me the answer as bullet points"),
    ("Answer in Spanish: what is the weather?", "Answer in Italian: what is the weather?"),
    ("How do I buy Bitcoin?", "How do I buy Ethereum?"),
    ("Convert 10 miles to km", "Convert 10 km to miles"),
    ("Is the museum wheelchair accessible?", "Is the museum accessible by public transport?"),
    ("How do I open a business account?", "How do I open a personal account?"),
    ("Can I pay my council tax monthly?", "Can I pay my council tax annually?"),
    ("How do I add a joint account holder?", "How do I remove a joint account holder?"),
    (
        "What's the interest rate on a fixed mortgage?",
        "What's the interest rate on a variable mortgage?",
    ),
    (
        "Is the train station accessible by wheelchair?",
        "Is the bus station accessible by wheelchair?",
    ),
    ("Can I take paracetamol with ibuprofen?", "Can I take paracetamol with alcohol?"),
    ("What's the minimum age to drive in the UK?", "What's the maximum age to drive in the UK?"),
    ("Can I get a mortgage with bad credit?", "Can I get a mortgage with good credit?"),
    ("How do I increase my contributions?", "How do I reduce my contributions?"),
    ("How do I switch to a smart meter?", "How do I switch from a smart meter?"),
    (
        "Is there a charge for withdrawing cash abroad?",
        "Is there a charge for withdrawing cash in the UK?",
    ),
    ("Can I bring my own wine?", "Can I bring my own food?"),
    ("How do I find my National Insurance number?", "How do I find my NHS number?"),
    ("When are bins collected on Monday?", "When are bins collected on Tuesday?"),
    ("What's the speed limit on a motorway?", "What's the speed limit on a dual carriageway?"),
    ("Is the store open on Easter Sunday?", "Is the store open on Easter Monday?"),
    ("Can I earn interest on my current account?", "Can I earn interest on my savings account?"),
    ("How do I reset my Apple ID password?", "How do I reset my Google account password?"),
    ("Can I take my dog into the restaurant?", "Can I take my cat into the restaurant?"),
    ("Is the 9am train running?", "Is the 10am train running?"),
    ("Do you deliver to Northern Ireland?", "Do you deliver to the Republic of Ireland?"),
    ("Are children allowed in the bar?", "Are dogs allowed in the bar?"),
    ("How do I book a double room?", "How do I book a twin room?"),
    ("Can I get a loan if I'm unemployed?", "Can I get a loan if I'm retired?"),
    ("How do I unlock my phone?", "How do I lock my phone?"),
    (
        "How many days of annual leave do full-time staff get?",
        "How many days of annual leave do part-time staff get?",
    ),
    ("How do I claim child benefit?", "How do I stop claiming child benefit?"),
    ("Is my deposit protected?", "Is my deposit unprotected?"),
    ("What's the dress code for men?", "What's the dress code for women?"),
    ("How do I encrypt a file?", "How do I decrypt a file?"),
    ("Is ibuprofen safe for adults?", "Is ibuprofen safe for children?"),
    ("Can I upgrade my broadband?", "Can I downgrade my broadband?"),
    ("What's the deadline for paper tax returns?", "What's the deadline for online tax returns?"),
]

# Known limitations, kept visible: each of these is misjudged today.
KNOWN_LIMITS = [
    ("How do I stop receiving marketing emails?", "How do I unsubscribe from marketing emails?"),
    ("How do I turn off auto-renew?", "How do I cancel automatic renewal?"),
    ("Where can I buy stamps?", "Where do you sell stamps?"),
    ("How do I register a birth?", "How can I register my baby's birth?"),
    ("How do I set up two-factor authentication?", "How do I enable 2FA?"),
    ("How do I get a new debit card?", "How can I replace my old debit card?"),
    (
        "Can I return an item without the original packaging?",
        "Can I send something back if I've thrown away the box?",
    ),
    ("How do I make my account private?", "How do I hide my profile from the public?"),
    ("How do I show hidden files?", "How do I hide files?"),
    ("Is the flight on time?", "Is the flight delayed?"),
    ("How do I report a lost passport?", "How do I report a stolen passport?"),
    ("Do I need a visa to visit Canada?", "Do I need a visa to work in Canada?"),
    ("How do I apply for a refund?", "How do I apply for an exchange?"),
    ("How do I pay for parking with the app?", "How do I pay for parking with cash?"),
    ("Can I return sale items?", "Can I return full-price items?"),
    ("Is the wifi free for guests?", "Is the wifi free for staff?"),
    ("What's the fine for speeding?", "What's the fine for parking on double yellow lines?"),
]

_KNOWN_SAME = {
    ("How do I stop receiving marketing emails?", "How do I unsubscribe from marketing emails?"),
    ("How do I turn off auto-renew?", "How do I cancel automatic renewal?"),
    ("Where can I buy stamps?", "Where do you sell stamps?"),
    ("How do I register a birth?", "How can I register my baby's birth?"),
    ("How do I set up two-factor authentication?", "How do I enable 2FA?"),
    ("How do I get a new debit card?", "How can I replace my old debit card?"),
    (
        "Can I return an item without the original packaging?",
        "Can I send something back if I've thrown away the box?",
    ),
    ("How do I make my account private?", "How do I hide my profile from the public?"),
}


def _ids(rows: Sequence[tuple[str, ...]]) -> list[str]:
    return [f"{i}-{r[0][:30]}" for i, r in enumerate(rows)]


@pytest.mark.parametrize(("a", "b"), PASS, ids=_ids(PASS))
def test_paraphrases_pass(a: str, b: str) -> None:
    assert check(a, b) is None
    assert check(b, a) is None


@pytest.mark.parametrize(("a", "b"), MORE_PASS, ids=_ids(MORE_PASS))
def test_more_paraphrases_pass(a: str, b: str) -> None:
    assert check(a, b) is None
    assert check(b, a) is None


@pytest.mark.parametrize(("a", "b"), MORE_TRAPS, ids=_ids(MORE_TRAPS))
def test_more_traps_are_refused(a: str, b: str) -> None:
    assert check(a, b) is not None
    assert check(b, a) is not None


@pytest.mark.parametrize(("a", "b"), KNOWN_LIMITS, ids=_ids(KNOWN_LIMITS))
def test_known_limits_are_still_misjudged(a: str, b: str) -> None:
    """Documented misjudgements; if one starts to pass, move it to the right table."""
    same = (a, b) in _KNOWN_SAME
    assert (check(a, b) is None) != same


@pytest.mark.parametrize(("guard", "a", "b"), TRAPS, ids=_ids(TRAPS))
def test_traps_are_refused(guard: str, a: str, b: str) -> None:
    ab, ba = check(a, b), check(b, a)
    assert ab is not None, "not refused"
    assert ba is not None, "refusal is not symmetric"
    assert ab.guard == guard, ab


@pytest.mark.parametrize(("guard", "a", "b"), TRAPS, ids=_ids(TRAPS))
def test_details_do_not_leak_text(guard: str, a: str, b: str) -> None:
    rej = check(a, b)
    assert rej is not None
    lowered = rej.detail.casefold()
    for text in (a, b):
        assert text.casefold() not in lowered
        for word in text.split():
            w = word.strip("?.,!").casefold()
            if len(w) > 5 and w not in guards.GUARDS:
                assert w not in lowered, f"detail leaks {w!r}"


def test_identical_texts_pass() -> None:
    for a, b in PASS:
        assert check(a, a) is None
        assert check(b, b) is None
    for _, a, b in TRAPS:
        assert check(a, a) is None
        assert check(b, b) is None


# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------


def test_guard_names_are_stable_and_unique() -> None:
    assert len(set(GUARDS)) == len(GUARDS)
    for required in (
        "numbers",
        "negation",
        "antonyms",
        "entities",
        "persons",
        "identifiers",
        "format",
        "language",
        "qualifiers",
    ):
        assert required in GUARDS
    assert GUARDS.index("numbers") < GUARDS.index("negation") < GUARDS.index("antonyms")


def test_rejection_is_frozen() -> None:
    rej = Rejection("numbers", "x")
    with pytest.raises(AttributeError):
        rej.guard = "other"  # type: ignore[misc]
    assert rej == Rejection("numbers", "x")


def test_rejection_guard_is_in_guards() -> None:
    for _, a, b in TRAPS:
        rej = check(a, b)
        assert rej is not None
        assert rej.guard in GUARDS


# --------------------------------------------------------------------------------------------
# normalize and unicode tricks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Hello   world \n", "Hello world"),
        ("Track order \uff14\uff18\uff12\uff11\uff13", "Track order 48213"),
        ("pass\u200bword", "password"),
        ("soft\u00adhyphen", "softhyphen"),
        ("\ufeffBOM at start", "BOM at start"),
        ("tab\tand\u00a0nbsp", "tab and nbsp"),
        ("\uff28\uff45\uff4c\uff4c\uff4f\uff01", "Hello!"),
        ("ﬁle", "file"),
        ("Keep Case, and punctuation?!", "Keep Case, and punctuation?!"),
        ("", ""),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


def test_normalize_is_idempotent() -> None:
    for a, b in PASS:
        for t in (a, b):
            assert normalize(normalize(t)) == normalize(t)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Track order \uff14\uff18\uff12\uff11\uff13", "Track order 48213"),
        ("Track order 48\u200b213", "Track order 48213"),
        ("How do I reset my pass\u200bword?", "How do I reset my password?"),
        ("Don\u2019t cancel my subscription", "Don't cancel my subscription"),
        ("Is it open\u00a0on Sunday?", "Is it open on Sunday?"),
        ("\uff23\uff41\uff4e\uff43\uff45\uff4c my subscription", "Cancel my subscription"),
    ],
)
def test_unicode_variants_pass(a: str, b: str) -> None:
    assert check(a, b) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Track order \uff14\uff18\uff12\uff11\uff13", "Track order 48231"),
        ("Don\u2019t cancel my subscription", "Cancel my subscription"),
        ("Cancel my subscription", "Do\u200bn't cancel my subscription"),
    ],
)
def test_unicode_variants_still_refused(a: str, b: str) -> None:
    assert check(a, b) is not None


# --------------------------------------------------------------------------------------------
# Symmetry and speed
# --------------------------------------------------------------------------------------------


def test_symmetry_over_all_pairs() -> None:
    texts = [t for pair in PASS for t in pair] + [t for _, a, b in TRAPS for t in (a, b)]
    texts = texts[::3]
    for a in texts:
        for b in texts:
            assert (check(a, b) is None) == (check(b, a) is None), (a, b)


def test_empty_and_odd_inputs() -> None:
    assert check("", "") is None
    assert check("?", "?!") is None
    assert check("", "Track order 1") is not None
    assert check("a" * 5000, "a" * 5000) is None


def test_recurring_questions_are_analysed_once() -> None:
    """A cache compares each new question with stored ones that recur: their analysis is
    remembered, so a check of known texts analyses nothing again. (Speed itself is
    measured by bench/cache_latency.py, not asserted here.)"""
    guards._features.cache_clear()
    pairs = [(a, b) for a, b in PASS] + [(a, b) for _, a, b in TRAPS]
    for a, b in pairs:
        check(a, b)
    analysed = guards._features.cache_info().misses
    assert analysed == len({text for pair in pairs for text in pair})
    for a, b in pairs:
        check(a, b)
    assert guards._features.cache_info().misses == analysed
